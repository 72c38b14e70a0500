"""CPU/CUDA parity: a small simulator run and a 3-peer swarm on each, same seed, same settings.

    python benchmarks/gpu_check.py            # about a minute or two on a GPU machine

Without CUDA it prints that it skipped and exits 0. With CUDA it prints a table of the mean final
test accuracy per run and device, writes benchmarks/results/gpu_check.json, and exits 1 when a
CUDA accuracy differs from the CPU one by more than TOLERANCE (float rounding on the GPU changes
the last digits, never the outcome).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from fedtorrent.config import DataConfig, MixingConfig, SimConfig
from fedtorrent.sim.run import simulate

TOLERANCE = 0.02
"""Largest |CUDA - CPU| mean accuracy accepted (2 points)."""
RESULTS = Path(__file__).parent / "results" / "gpu_check.json"


def sim_accuracy(device: str) -> float:
    config = SimConfig(
        data=DataConfig(dataset="digits", num_nodes=8), mixing=MixingConfig(rule="learned"),
        rounds=10,
    )  # fmt: skip
    outcomes, _ = simulate(config, device=device)
    return statistics.fmean(outcomes[0].accuracies)


def swarm_accuracy(device: str, folder: Path) -> float:
    from fedtorrent.cli.net import create
    from fedtorrent.node.swarm import SwarmConfig, run_swarm

    torrent = folder / "session.torrent"
    create(output=torrent, tracker="http://127.0.0.1:1/announce", dataset="digits", nodes=3,
           cohort=2, rounds=10, mixing="learned")  # fmt: skip
    summary = run_swarm(
        SwarmConfig(torrent=torrent, out=folder / f"run-{device}", peers=3, device=device),
        timeout=120,
        plots=False,
    )
    return float(summary["test_accuracy_mean"])


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: skipped (CUDA is not available on this machine)")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (("simulate", sim_accuracy),
                          ("swarm", lambda d: swarm_accuracy(d, Path(tmp)))):  # fmt: skip
            cpu, cuda = run("cpu"), run("cuda")
            rows.append({"run": name, "cpu": cpu, "cuda": cuda, "ok": abs(cpu - cuda) <= TOLERANCE})
    print(f"{'run':<10}{'cpu':>10}{'cuda':>10}  parity (|diff| <= {TOLERANCE})")
    for row in rows:
        verdict = "ok" if row["ok"] else "FAIL"
        print(f"{row['run']:<10}{row['cpu']:>10.4f}{row['cuda']:>10.4f}  {verdict}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=2)
    )
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
