"""A sybil flood against a live swarm (issue 10, finding 2); writes ``results/sybil.md``, ``.json``.

    FEDTORRENT_DATA=../shared/data .venv/bin/python experiments/sybil.py [--fakes 1500] [--rounds 8]

A real tracker (its default settings; then again with its per-address cap off, so that only the
peers' neighbour book defends them) and 3 real ``fedtorrent peer`` processes on 127.0.0.1: MNIST,
logistic regression, learned trust, cohort 20, ``fedtorrent create``'s defaults otherwise. First a
clean run; then, for each tracker, a run of a new session into which ``--fakes`` fake peer ids were
announced from ``--sources`` loopback addresses (127.0.0.2 ...), each with a valid Ed25519 key and
a port where nothing listens, re-announced while the peers run so that none expires. Reported per
run: how many fakes the tracker accepted, the honest peers' average number of honest neighbours
heard per round (of 2), rounds with none, final test accuracy, candidates skipped by reason, and
the wall time. Every number in the files comes from the runs. The peers' folders (keys, ledgers,
checkpoints) go to ``--work`` (``runs/sybil``, not tracked).
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from fedtorrent.cli.net import create
from fedtorrent.config import TrackerConfig
from fedtorrent.metrics.records import read_records
from fedtorrent.net.torrent import load_torrent
from fedtorrent.net.tracker.server import BackgroundTracker
from fedtorrent.node.swarm import SwarmConfig, peer_folder, run_swarm
from fedtorrent.sybils import announce_fakes, closed_port, loopback_sources

PEERS = 3
COHORT = 20


def _session(folder: Path, name: str, url: str, rounds: int) -> Path:
    torrent = folder / f"{name}.torrent"
    create(
        output=torrent, tracker=url, dataset="mnist", model="logreg", nodes=PEERS,
        rounds=rounds, cohort=COHORT, mixing="learned", name=f"sybil-{name}",
    )  # fmt: skip
    return torrent


def _measure(out: Path, summary: dict[str, Any], fakes: set[str]) -> dict[str, Any]:
    heard: list[int] = []
    for index in range(PEERS):
        for record in read_records(peer_folder(out, index) / "metrics.jsonl"):
            heard.append(len(set(record["heard_from"]) - fakes))
    return {
        "finished": summary["finished"],
        "peer_rounds": len(heard),
        "honest_heard_per_round": sum(heard) / len(heard) if heard else None,
        "rounds_without_honest": sum(h == 0 for h in heard),
        "test_accuracy_mean": summary["test_accuracy_mean"],
        "test_accuracies": [p["test_accuracy"] for p in summary["per_peer"]],
        "neighbours": summary.get("neighbours"),
        "wall_seconds": summary["wall_seconds"],
    }


def _keep_listed(
    done: threading.Event, url: str, info_hash: str, count: int, sources: list[str], port: int
) -> None:
    """Re-announce the fakes until ``done``: the tracker forgets peers silent for two intervals."""
    while not done.wait(TrackerConfig().interval / 2):
        announce_fakes(url, info_hash, count=count, sources=sources, port=port, event="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fakes", type=int, default=1500)
    parser.add_argument("--sources", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--exchange-timeout", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--work", type=Path, default=Path("runs/sybil"))
    args = parser.parse_args()
    for name in ("clean", "flooded", "flooded-no-cap"):  # this script's own earlier runs
        shutil.rmtree(args.work / name, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"fakes": args.fakes, "sources": args.sources, "rounds": args.rounds}
    # The tracker's default per-address cap, then none: the peers' neighbour book alone.
    for name, cap in (("flooded", TrackerConfig().max_peers_per_address), ("flooded-no-cap", 0)):
        db = args.work / f"tracker-{name}.sqlite"
        db.unlink(missing_ok=True)
        config = TrackerConfig(port=closed_port(), db_path=db, max_peers_per_address=cap)
        with BackgroundTracker(config) as tracker:
            url = tracker.server.announce_url

            def run(name: str, torrent: Path, url: str = url) -> dict[str, Any]:
                swarm = SwarmConfig(
                    torrent=torrent, out=args.work / name, peers=PEERS, tracker=url,
                    exchange_timeout=args.exchange_timeout,
                )  # fmt: skip
                return run_swarm(swarm, plots=False)

            if "clean" not in results:
                clean = run("clean", _session(args.work, "clean", url, args.rounds))
                results["clean"] = _measure(args.work / "clean", clean, set())

            torrent = _session(args.work, name, url, args.rounds)
            info_hash = load_torrent(torrent).info_hash
            sources, port = loopback_sources(args.sources), closed_port()
            started = time.perf_counter()
            flood = announce_fakes(url, info_hash, count=args.fakes, sources=sources, port=port)
            done = threading.Event()

            refresher = threading.Thread(
                target=_keep_listed,
                args=(done, url, info_hash, args.fakes, sources, port),
                daemon=True,
            )
            refresher.start()
            try:
                flooded = run(name, torrent)
            finally:
                done.set()
                refresher.join(60)
            results[name] = _measure(args.work / name, flooded, set(flood.accepted))
            results[name].update(
                address_cap=cap,
                announce_seconds=time.perf_counter() - started,
                tracker_statuses={str(k): v for k, v in sorted(flood.statuses.items())},
                fakes_accepted=len(flood.accepted),
            )
    clean_acc = results["clean"]["test_accuracy_mean"]
    for name in ("flooded", "flooded-no-cap"):
        acc = results[name]["test_accuracy_mean"]
        results[name]["accuracy_gap_points"] = (
            None if clean_acc is None or acc is None else 100 * (clean_acc - acc)
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sybil.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (args.out / "sybil.md").write_text(_markdown(results))
    print(_markdown(results))


def _markdown(results: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    lines = [
        "# Sybil flood against a live swarm",
        "",
        "Command: `FEDTORRENT_DATA=../shared/data .venv/bin/python experiments/sybil.py "
        f"--fakes {results['fakes']} --sources {results['sources']} --rounds {results['rounds']}`",
        "",
        f"3 peers, MNIST, logistic regression, learned trust, cohort {COHORT}, "
        f"{results['rounds']} rounds. {results['fakes']} fake ids (closed ports, valid keys) are "
        f"announced from {results['sources']} loopback addresses into a live session, and kept "
        "listed while it runs. `flooded` uses the tracker's default cap on peer ids per address; "
        "`flooded-no-cap` turns the cap off, so only the peers' neighbour book defends them.",
        "",
        "| run | ids per address cap | tracker answers (HTTP status: count) | fakes listed |",
        "|---|---|---|---|",
        *(
            f"| {name} | {results[name]['address_cap'] or 'off'} "
            f"| {results[name]['tracker_statuses']} | {results[name]['fakes_accepted']} |"
            for name in ("flooded", "flooded-no-cap")
        ),
        "",
        "| run | finished | honest neighbours heard / round (of 2) | peer-rounds without one "
        "| test accuracy | candidates skipped | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("clean", "flooded", "flooded-no-cap"):
        row = results[name]
        skipped = (row.get("neighbours") or {}).get("candidates_skipped") or {}
        heard = row["honest_heard_per_round"]
        lines.append(
            f"| {name} | {row['finished']}/3 | {'-' if heard is None else f'{heard:.2f}'} "
            f"| {row['rounds_without_honest']} of {row['peer_rounds']} "
            f"| {pct(row['test_accuracy_mean'])} | {skipped or 0} | {row['wall_seconds']:.0f} |"
        )
    lines.append("")
    for name in ("flooded", "flooded-no-cap"):
        gap = results[name]["accuracy_gap_points"]
        lines.append(
            f"Accuracy gap (clean - {name}): {'-' if gap is None else f'{gap:.2f}'} points."
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
