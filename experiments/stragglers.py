"""Stragglers: the synchronous against the asynchronous mode, time to accuracy (issue 13).

    FEDTORRENT_DATA=../shared/data .venv/bin/python experiments/stragglers.py \
        [--peers 12] [--rounds 12] [--slow 25%x4] [--staleness 2]

One session (``fedtorrent create --dataset mnist --model logreg --nodes N --mixing learned
--cohort 3``), run twice as a real swarm (``fedtorrent swarm``: a tracker and N peer processes)
with the same stragglers (``--slow``: the last quarter of the peers 4x slower, a simulated slow
device, ``peer --slowdown``): once synchronous (every peer waits, within its adaptive deadline,
for its neighbours' state of its round) and once asynchronous (``--staleness K``: each
neighbour's newest state at most K rounds old, nobody waited for).

Measured, from the peers' records (``rounds.jsonl``: each record's ``finished_at`` wall clock):

- the mean test accuracy over time: after each record, the mean over all peers of each peer's
  latest test accuracy (from the moment every peer has one), seconds since the swarm started;
- per round: the mean test accuracy of the round and when its last peer finished it;
- the final mean accuracy (``summary.json``) and the wall time of each run;
- **time to accuracy**: the seconds until the mean accuracy first reaches the synchronous run's
  final accuracy (``TARGET`` x it), in each run.

The asynchronous run gets twice the rounds (``--async-rounds``): its fast peers do more rounds in
the time the synchronous swarm spends waiting for the slow ones, which is the point of the mode;
time to accuracy stops at the first time the target is reached, so the extra rounds cost it
nothing. The session keeps a constant local rate (``--round-schedule constant``, changeable), so
that those extra rounds still learn: under ``cosine`` every round past the session's last runs
at its smallest rate. Per round, the asynchronous mode learns a little less (it mixes states a
round or two old, and drops the stragglers' when they fall more than K rounds behind).

Writes ``results/stragglers.json`` and ``results/stragglers.md``; runs go to ``--work``
(``runs/stragglers``, not tracked). A tiny check: ``--peers 4 --rounds 3``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtorrent.metrics.records import read_records
from fedtorrent.node.swarm import SlowPeers

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.0
"""Time to accuracy counts until the mean reaches this share of the synchronous final accuracy."""


def _cli(*args: str) -> float:
    """Run ``fedtorrent ARGS``; its wall time. A failure stops the experiment with its output."""
    tick = time.perf_counter()
    command = [sys.executable, "-c", "from fedtorrent.cli import main; main()", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fedtorrent {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - tick


def accuracy_over_time(
    records: Sequence[dict[str, Any]], *, peers: int, started: float
) -> list[tuple[float, float]]:
    """``(seconds since started, mean over peers of each one's latest test accuracy)`` after each
    record, in time order, from the moment every one of ``peers`` has a record."""
    latest: dict[int, float] = {}
    curve = []
    timed = [r for r in records if r.get("finished_at") is not None and r.get("test_accuracy")]
    for record in sorted(timed, key=lambda r: float(r["finished_at"])):
        latest[int(record["node"])] = float(record["test_accuracy"])
        if len(latest) == peers:
            curve.append((float(record["finished_at"]) - started, sum(latest.values()) / peers))
    return curve


def time_to(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """The first time the curve is at or above ``target``; None when it never is."""
    return next((t for t, mean in curve if mean >= target - 1e-12), None)


def per_round(records: Sequence[dict[str, Any]], *, started: float) -> list[dict[str, Any]]:
    """Per round: the mean test accuracy of the peers that did it and when the last one did."""
    rounds: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("test_accuracy") is not None:
            rounds.setdefault(int(record["round"]), []).append(record)
    return [
        {
            "round": r,
            "peers": len(rows),
            "accuracy": sum(float(x["test_accuracy"]) for x in rows) / len(rows),
            "seconds": max(float(x["finished_at"]) for x in rows) - started,
        }
        for r, rows in sorted(rounds.items())
    ]


def run(folder: Path, torrent: Path, args: argparse.Namespace, *, staleness: int) -> dict[str, Any]:
    """One swarm of the session; its summary, curves and timings."""
    shutil.rmtree(folder, ignore_errors=True)
    rounds = args.async_rounds if staleness and args.async_rounds else args.rounds
    extra = ["--staleness", str(staleness)] if staleness else []
    if args.exchange_timeout is not None:
        extra += ["--exchange-timeout", str(args.exchange_timeout)]
    seconds = _cli(
        "swarm", str(torrent), "--peers", str(args.peers), "--out", str(folder), "--no-live",
        "--no-plots", "--rounds", str(rounds), "--slow", args.slow, *extra,
    )  # fmt: skip
    summary = json.loads((folder / "summary.json").read_text())
    started = float(json.loads((folder / "swarm.json").read_text())["started"])
    records = list(read_records(folder / "rounds.jsonl"))
    waits = [float(r["timings"]["exchange"]) for r in records if "timings" in r]
    return {
        "mode": f"asynchronous (--staleness {staleness})" if staleness else "synchronous",
        "staleness": staleness,
        "rounds": rounds,
        "finished": summary["finished"],
        "peers": summary["peers"],
        "slow_peers": summary.get("slow_peers", []),
        "final_accuracy": summary["test_accuracy_mean"],
        "final_accuracy_std": summary["test_accuracy_std"],
        "wall_seconds": summary["wall_seconds"],
        "command_seconds": seconds,
        "last_record_seconds": max(float(r["finished_at"]) for r in records) - started,
        "exchange_seconds_mean": sum(waits) / len(waits) if waits else None,
        "deadline_seconds_mean": sum(float(r["deadline_s"]) for r in records) / len(records),
        "too_stale": sum(list(r["missing"].values()).count("too_stale") for r in records),
        "per_round": per_round(records, started=started),
        "curve": accuracy_over_time(records, peers=summary["peers"], started=started),
    }


def report(results: dict[str, Any]) -> str:
    """``results/stragglers.md`` from the results."""
    sync, asyn = results["sync"], results["async"]
    target = results["target"]

    def secs(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f}"

    lines = [
        "# Stragglers: synchronous against asynchronous mixing",
        "",
        f"`python experiments/stragglers.py {results['args']}` ({results['date']}); MNIST, "
        f"logistic regression, {results['peers']} real peers, cohorts of 3, learned "
        f"trust, `--slow {results['slow']}` (peers {', '.join(map(str, sync['slow_peers']))} "
        f"wait {results['factor'] - 1:g}x their shortest training time after training: a "
        "simulated slow device).",
        "",
        "| mode | rounds | final accuracy % | wall s | time to "
        f"{100 * target:.2f}% s | mean exchange s | mean deadline s | dropped too stale |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in (sync, asyn):
        lines.append(
            f"| {row['mode']} | {row['rounds']} | {100 * row['final_accuracy']:.2f} ± "
            f"{100 * row['final_accuracy_std']:.2f} | {row['wall_seconds']:.1f} | "
            f"{secs(row['time_to_target'])} | {row['exchange_seconds_mean']:.2f} | "
            f"{row['deadline_seconds_mean']:.2f} | {row['too_stale']} |"
        )
    a, s = asyn["time_to_target"], sync["time_to_target"]
    verdict = (
        f"The asynchronous mode reaches the synchronous final accuracy ({100 * target:.2f}%) "
        f"after {secs(a)} s, against {secs(s)} s synchronously: "
        + ("**less wall time** (done)." if a is not None and s is not None and a < s else
           "**not** less wall time.")
    )  # fmt: skip
    lines += ["", verdict, "", "Mean test accuracy per round (and when its last peer ended it):"]
    lines += ["", "| round | sync % | sync s | async % | async s |", "|---|---|---|---|---|"]
    by_round = {r["round"]: r for r in asyn["per_round"]}
    for row in sync["per_round"]:
        other = by_round.get(row["round"])
        lines.append(
            f"| {row['round']} | {100 * row['accuracy']:.2f} | {row['seconds']:.1f} | "
            + (f"{100 * other['accuracy']:.2f} | {other['seconds']:.1f} |" if other else "| |")
        )
    lines += [
        "",
        "Time to accuracy counts from the swarm's start (peer start-up included in both runs) "
        "until the mean over all peers of each peer's latest test accuracy first reaches the "
        "target. Raw curves in `results/stragglers.json`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Create the session, run both swarms, write the JSON and the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument(
        "--async-rounds", type=int, default=None, help="default 2 x --rounds (see the docstring)"
    )
    parser.add_argument("--round-schedule", default="constant", help="the session's lr schedule")
    parser.add_argument("--slow", default="25%x4")
    parser.add_argument("--staleness", type=int, default=2)
    parser.add_argument("--exchange-timeout", type=float, default=None)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "stragglers")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    args.async_rounds = args.async_rounds or 2 * args.rounds
    args.work.mkdir(parents=True, exist_ok=True)
    torrent = args.work / "session.torrent"
    _cli(
        "create", "--output", str(torrent), "--dataset", "mnist", "--model", "logreg", "--nodes",
        str(args.peers), "--mixing", "learned", "--cohort", "3", "--rounds", str(args.rounds),
        "--round-schedule", args.round_schedule,
    )  # fmt: skip
    print("synchronous", flush=True)
    sync = run(args.work / "sync", torrent, args, staleness=0)
    print(f"asynchronous (--staleness {args.staleness})", flush=True)
    asyn = run(args.work / "async", torrent, args, staleness=args.staleness)
    target = TARGET * sync["final_accuracy"]
    for row in (sync, asyn):
        row["time_to_target"] = time_to(row["curve"], target)
    results = {
        "args": " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "peers": args.peers,
        "slow": args.slow,
        "factor": SlowPeers.parse(args.slow).factor,
        "target": target,
        "sync": sync,
        "async": asyn,
        "done": asyn["time_to_target"] is not None
        and sync["time_to_target"] is not None
        and asyn["time_to_target"] < sync["time_to_target"],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "stragglers.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.results / "stragglers.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
