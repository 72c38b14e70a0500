"""A sybil flood against a live swarm (issue 10, finding 2); writes ``results/sybil.md``, ``.json``.

    FEDTORRENT_DATA=../shared/data .venv/bin/python experiments/sybil.py [--fakes 1500] [--rounds 8]

A real tracker (its default settings, so a per-address cap applies when the tracker has one) and
3 real ``fedtorrent peer`` processes on 127.0.0.1: MNIST, logistic regression, learned trust,
cohort 20, ``fedtorrent create``'s defaults otherwise. First a clean run; then a run of the same
session into which ``--fakes`` fake peer ids were announced from ``--sources`` loopback addresses
(127.0.0.2 ...), each with a valid Ed25519 key and a port where nothing listens, re-announced
while the peers run so that none expires. Reported per run: how many fakes the tracker accepted,
the honest peers' average number of honest neighbours heard per round (of 2), rounds with none,
final test accuracy, candidates skipped by reason, and the wall time. Every number in the files
comes from the runs. The peers' folders (keys, ledgers, checkpoints) go to ``--work``
(``runs/sybil``, not tracked).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fakes", type=int, default=1500)
    parser.add_argument("--sources", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--exchange-timeout", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--work", type=Path, default=Path("runs/sybil"))
    args = parser.parse_args()
    for name in ("clean", "flooded"):  # this script's own earlier runs
        shutil.rmtree(args.work / name, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    config = TrackerConfig(port=closed_port(), db_path=args.work / "tracker.sqlite")
    results: dict[str, Any] = {"fakes": args.fakes, "sources": args.sources, "rounds": args.rounds}
    with BackgroundTracker(config) as tracker:
        url = tracker.server.announce_url

        def run(name: str, torrent: Path) -> dict[str, Any]:
            swarm = SwarmConfig(
                torrent=torrent, out=args.work / name, peers=PEERS, tracker=url,
                exchange_timeout=args.exchange_timeout,
            )  # fmt: skip
            return run_swarm(swarm, plots=False)

        clean = run("clean", _session(args.work, "clean", url, args.rounds))
        results["clean"] = _measure(args.work / "clean", clean, set())

        torrent = _session(args.work, "flooded", url, args.rounds)
        info_hash = load_torrent(torrent).info_hash
        sources, port = loopback_sources(args.sources), closed_port()
        started = time.perf_counter()
        flood = announce_fakes(url, info_hash, count=args.fakes, sources=sources, port=port)
        results["announce_seconds"] = time.perf_counter() - started
        results["tracker_statuses"] = {str(k): v for k, v in sorted(flood.statuses.items())}
        results["fakes_accepted"] = len(flood.accepted)
        done = threading.Event()

        def keep_listed() -> None:  # the tracker forgets peers silent for two intervals
            while not done.wait(config.interval / 2):
                announce_fakes(
                    url, info_hash, count=args.fakes, sources=sources, port=port, event=""
                )

        refresher = threading.Thread(target=keep_listed, daemon=True)
        refresher.start()
        try:
            flooded = run("flooded", torrent)
        finally:
            done.set()
            refresher.join(60)
        results["flooded"] = _measure(args.work / "flooded", flooded, set(flood.accepted))
    clean_acc = results["clean"]["test_accuracy_mean"]
    flooded_acc = results["flooded"]["test_accuracy_mean"]
    results["accuracy_gap_points"] = (
        None if clean_acc is None or flooded_acc is None else 100 * (clean_acc - flooded_acc)
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
        f"{results['rounds']} rounds. {results['fakes']} fake ids announced from "
        f"{results['sources']} loopback addresses in {results['announce_seconds']:.1f} s; "
        f"the tracker answered {results['tracker_statuses']} (HTTP status: count) and "
        f"listed {results['fakes_accepted']} of them.",
        "",
        "| run | finished | honest neighbours heard / round (of 2) | peer-rounds without one "
        "| test accuracy | candidates skipped | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("clean", "flooded"):
        row = results[name]
        skipped = (row.get("neighbours") or {}).get("candidates_skipped") or {}
        heard = row["honest_heard_per_round"]
        lines.append(
            f"| {name} | {row['finished']}/3 | {'-' if heard is None else f'{heard:.2f}'} "
            f"| {row['rounds_without_honest']} of {row['peer_rounds']} "
            f"| {pct(row['test_accuracy_mean'])} | {skipped or 0} | {row['wall_seconds']:.0f} |"
        )
    gap = results["accuracy_gap_points"]
    lines += [
        "",
        f"Accuracy gap (clean - flooded): {'-' if gap is None else f'{gap:.2f}'} points.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
