"""A real swarm on this machine against its size: wall time, CPU, memory per peer, accuracy.

For each N, ``fedtorrent create`` makes an MNIST logistic-regression session of N nodes (cohorts
of 3, learned trust, 10 rounds), ``run_swarm`` runs N real peers on it with the launcher's default
process count (``--processes`` overrides it), and the simulator runs the same session in the same
process right after, so both accuracies come from one run of this script.

    FEDTORRENT_DATA=../shared/data .venv/bin/python benchmarks/swarm_scale.py [--sizes 6,24,48,100]

Prints a table and writes ``benchmarks/results/swarm_scale.json`` (``--out`` changes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fedtorrent as ft
from fedtorrent.cli.net import create
from fedtorrent.config import SimConfig, TopologyConfig
from fedtorrent.net.torrent import load_torrent
from fedtorrent.node.swarm import SwarmConfig, default_processes, run_swarm
from fedtorrent.sim.run import load_for, run_one

OUT = Path(__file__).parent / "results" / "swarm_scale.json"
ROUNDS = 10
COHORT = 3


def swarm_row(work: Path, peers: int, processes: int | None, rounds: int) -> dict[str, Any]:
    """Run ``peers`` real peers on a fresh session, then the simulator on the same session."""
    torrent = work / f"n{peers}" / "session.torrent"
    create(output=torrent, dataset="mnist", model="logreg", nodes=peers, rounds=rounds,
           cohort=COHORT, mixing="learned")  # type: ignore[arg-type]  # fmt: skip
    config = SwarmConfig(
        torrent=torrent, out=torrent.parent / "run", peers=peers, processes=processes,
        exchange_timeout=30.0,
    )  # fmt: skip
    summary = run_swarm(config, plots=False, progress=False)
    used = summary["resources"]
    session = load_torrent(torrent).session
    sim = SimConfig(
        data=session.data,
        model=session.model,
        train=session.train,
        mixing=session.mixing,
        topology=TopologyConfig(kind="random_cohort", degree=session.cohort_size),
        rounds=session.rounds,
        round_schedule=session.round_schedule,
        seed=session.train.seed,
    )
    tick = time.perf_counter()
    outcome = run_one(sim, dataset=load_for(sim))
    sim_seconds = time.perf_counter() - tick
    simulated = sum(outcome.accuracies) / len(outcome.accuracies)
    return {
        "peers": peers,
        "processes": used["processes"],
        "finished": summary["finished"],
        "wall_seconds": round(summary["wall_seconds"], 1),
        "cpu_seconds": used["cpu_seconds"],
        "peak_memory_bytes": used["peak_memory_bytes"],
        "memory_per_peer_bytes": used["memory_per_peer_bytes"],
        "swarm_accuracy": summary["test_accuracy_mean"],
        "swarm_accuracy_std": summary["test_accuracy_std"],
        "sim_accuracy": simulated,
        "sim_seconds": round(sim_seconds, 1),
        "gap_points": 100 * (summary["test_accuracy_mean"] - simulated),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| peers | processes | finished | wall s | CPU s | peak memory | per peer | swarm acc % "
        "| sim acc % | gap (points) | sim s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mib = (r["peak_memory_bytes"] or 0) / 2**20
        per = (r["memory_per_peer_bytes"] or 0) / 2**20
        lines.append(
            f"| {r['peers']} | {r['processes']} | {r['finished']} | {r['wall_seconds']:.1f} "
            f"| {r['cpu_seconds']:.1f} | {mib:.0f} MiB | {per:.1f} MiB "
            f"| {100 * r['swarm_accuracy']:.2f} | {100 * r['sim_accuracy']:.2f} "
            f"| {r['gap_points']:+.2f} | {r['sim_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="6,24,48,100", help="Comma-separated peer counts.")
    parser.add_argument("--processes", type=int, default=None, help="Override the default.")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="swarm_scale-"))
    try:
        for peers in sizes:
            processes = args.processes if args.processes is None else min(args.processes, peers)
            row = swarm_row(work, peers, processes, args.rounds)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "rounds": args.rounds,
        "cohort": COHORT,
        "default_processes": {str(n): default_processes(n) for n in sizes},
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "fedtorrent": ft.__version__,
        "rows": rows,
    }
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
