"""Time per simulated round against the number of nodes: vectorized engine vs a plain loop.

One round = every node trains one local epoch on its share of the MNIST training set (the whole
set is split evenly, so the arithmetic per round is the same for every N), then mixes with a fresh
random cohort of 4 peers (fixed weights). The plain loop does the same work the obvious way: N
separate ``nn.Module``s, each with its own ``torch.optim.SGD``, batches gathered by fancy
indexing, and mixing by summing state dicts node by node.

Also times the seed workload (MNIST, 6 nodes, logistic regression, 10 rounds of 1 local epoch,
batch 64) and profiles where the engine's training time goes.

    FEDTORRENT_DATA=../shared/data .venv/bin/python benchmarks/sim_speed.py [--quick]

Prints tables and writes ``benchmarks/results/sim_speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedtorrent.config import DataConfig, MixingConfig, TopologyConfig, TrainConfig
from fedtorrent.data.datasets import Dataset, load_dataset
from fedtorrent.data.partition import split_nodes
from fedtorrent.models import build_model
from fedtorrent.sim.engine import Engine, make_backend, node_data
from fedtorrent.sim.topology import Topology
from fedtorrent.state import flatten

COHORT = 4
OUT = Path(__file__).parent / "results" / "sim_speed.json"


def subset(dataset: Dataset, count: int) -> Dataset:
    from dataclasses import replace

    return replace(dataset, x_train=dataset.x_train[:count], y_train=dataset.y_train[:count])


def build(dataset: Dataset, model: str, nodes: int, train: TrainConfig, rule: str = "fixed"):
    splits = split_nodes(dataset.y_train, DataConfig(num_nodes=nodes, split="iid"))
    data = node_data(
        x_train=dataset.x_train,
        y_train=dataset.y_train,
        x_test=dataset.x_test[:1000],
        y_test=dataset.y_test[:1000],
        splits=[(s.train, s.val) for s in splits],
        num_classes=dataset.num_classes,
    )
    torch.manual_seed(0)
    net = build_model(model, input_shape=dataset.input_shape, num_classes=dataset.num_classes)
    kind = "complete" if nodes <= COHORT + 1 else "random_cohort"
    topology = Topology(TopologyConfig(kind=kind, degree=COHORT), num_nodes=nodes, seed=0)
    engine = Engine(
        backend=make_backend(net, input_shape=dataset.input_shape),
        data=data,
        train=train,
        mixing=MixingConfig(rule=rule),
        topology=topology,
        init=flatten(net.state_dict()),
        seed=0,
    )
    return engine, net, splits, topology


def summarize(times: list[float], train: list[float], mix: list[float]) -> dict[str, float]:
    """Best and median of the timed rounds: the best is the least disturbed by other processes."""
    return {
        "round_s": min(times),
        "round_median_s": statistics.median(times),
        "train_s": min(train),
        "mix_s": min(mix),
    }


def time_engine(engine: Engine, rounds: int) -> dict[str, float]:
    engine.run_round(0)  # warm-up
    times, train, mix = [], [], []
    for r in range(1, rounds + 1):
        t0, m0 = engine.timings.train, engine.timings.mix + engine.timings.trust
        start = time.perf_counter()
        engine.run_round(r)
        times.append(time.perf_counter() - start)
        train.append(engine.timings.train - t0)
        mix.append(engine.timings.mix + engine.timings.trust - m0)
    return summarize(times, train, mix)


class PlainLoop:
    """N separate modules and optimizers: the simulator one writes first."""

    def __init__(
        self, dataset: Dataset, net: nn.Module, splits, topology: Topology, train: TrainConfig
    ):
        self.x = torch.from_numpy(dataset.x_train)
        self.y = torch.from_numpy(dataset.y_train)
        self.parts = [torch.from_numpy(s.train) for s in splits]
        self.models = [copy.deepcopy(net) for _ in splits]
        self.optimizers = [torch.optim.SGD(m.parameters(), lr=train.lr) for m in self.models]
        self.topology = topology
        self.batch = train.batch_size
        self.generator = torch.Generator().manual_seed(0)

    def run_round(self, round_index: int) -> tuple[float, float]:
        start = time.perf_counter()
        for model, optimizer, part in zip(self.models, self.optimizers, self.parts, strict=True):
            order = part[torch.randperm(len(part), generator=self.generator)]
            for s in range(0, len(order), self.batch):
                index = order[s : s + self.batch]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(self.x[index]), self.y[index]).backward()
                optimizer.step()
        trained = time.perf_counter()
        adjacency = self.topology.cohorts(round_index)
        states = [{k: v.clone() for k, v in m.state_dict().items()} for m in self.models]
        for i, model in enumerate(self.models):
            members = [i, *adjacency[i].nonzero().squeeze(1).tolist()]
            mixed = {k: sum(states[j][k] for j in members) / len(members) for k in states[i]}
            model.load_state_dict(mixed)
        return trained - start, time.perf_counter() - trained


def time_loop(loop: PlainLoop, rounds: int) -> dict[str, float]:
    loop.run_round(0)
    times, train, mix = [], [], []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        t, m = loop.run_round(r)
        times.append(time.perf_counter() - start)
        train.append(t)
        mix.append(m)
    return summarize(times, train, mix)


def sweep(
    dataset: Dataset, model: str, sizes: list[int], rounds: int, loop_limit: int
) -> list[dict]:
    train = TrainConfig(epochs=1, batch_size=64, lr=0.05)
    rows = []
    for nodes in sizes:
        engine, net, splits, topology = build(dataset, model, nodes, train)
        fast = time_engine(engine, rounds)
        row = {"model": model, "nodes": nodes, "examples": len(dataset.y_train), "engine": fast}
        if nodes <= loop_limit:
            loop = PlainLoop(dataset, net, splits, topology, train)
            row["loop"] = time_loop(loop, rounds)
            row["speedup"] = row["loop"]["round_s"] / fast["round_s"]
            row["speedup_median"] = row["loop"]["round_median_s"] / fast["round_median_s"]
        rows.append(row)
        loop_s = f"{row['loop']['round_s']:.3f}" if "loop" in row else "-"
        speed = f"{row['speedup']:.1f}x" if "speedup" in row else "-"
        print(
            f"{model:7s} {nodes:5d} {fast['round_s']:9.3f} {fast['train_s']:9.3f} "
            f"{fast['mix_s']:8.4f} {loop_s:>9s} {speed:>8s}",
            flush=True,
        )
    return rows


def seed_workload(dataset: Dataset, repeats: int) -> dict:
    """MNIST, 6 nodes, logreg, 10 rounds of 1 epoch, batch 64: training-loop seconds."""
    train = TrainConfig(epochs=1, batch_size=64, lr=0.1)
    engine_s, loop_s = [], []
    for _ in range(repeats):
        engine, net, splits, topology = build(dataset, "logreg", 6, train)
        for r in range(10):
            engine.run_round(r)
        engine_s.append(engine.timings.train)
        loop = PlainLoop(dataset, net, splits, topology, train)
        loop_s.append(sum(loop.run_round(r)[0] for r in range(10)))
    return {
        "engine_train_s": min(engine_s),
        "engine_train_s_all": engine_s,
        "loop_train_s": min(loop_s),
        "loop_train_s_all": loop_s,
        "steps": 10 * 125,
    }


def profile_seed_workload(dataset: Dataset) -> list[tuple[str, float]]:
    """Self CPU time of the top operators in the engine's training loop (10 rounds)."""
    from torch.profiler import ProfilerActivity, profile

    engine, *_ = build(dataset, "logreg", 6, TrainConfig(epochs=1, batch_size=64, lr=0.1))
    engine.train_round(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for r in range(1, 11):
            engine.train_round(r)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) / 1e6
    top = [(e.key, e.self_cpu_time_total / 1e6) for e in rows[:8]]
    return [("all aten ops", total), *top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and rounds")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    mnist = load_dataset("mnist", progress=False)
    train_set = subset(mnist, 48_000)
    if args.quick:
        linear_sizes, cnn_sizes, rounds = [6, 100], [6], 2
    else:
        linear_sizes, cnn_sizes, rounds = [6, 10, 30, 100, 300, 1000], [6, 30, 100], 4
    cpu = platform.processor() or platform.machine()
    results: dict[str, dict] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        load = os.getloadavg()[0]
        print(f"\ntorch {torch.__version__}, {threads} thread(s), {cpu}, load average {load:.2f}")
        print("round times are the best of the timed rounds (least disturbed by other processes)")
        header = ("model", "nodes", "round_s", "train_s", "mix_s", "loop_s", "speedup")
        print(f"{header[0]:7s} " + " ".join(f"{h:>9s}" for h in header[1:]))
        rows = sweep(train_set, "logreg", linear_sizes, rounds, loop_limit=1000)
        # The CNN costs ~17 MFLOP per example: a 6,000-image subset keeps a round near a second.
        rows += sweep(subset(mnist, 6_000), "cnn", cnn_sizes, max(1, rounds - 2), loop_limit=1000)
        seed = seed_workload(train_set, repeats=1 if args.quick else 3)
        print(
            f"seed workload (MNIST, 6 nodes, logreg, 10 rounds x 1 epoch, batch 64): "
            f"engine {seed['engine_train_s']:.3f} s, plain loop {seed['loop_train_s']:.3f} s "
            f"({seed['loop_train_s'] / seed['engine_train_s']:.1f}x); "
            f"{1e3 * seed['engine_train_s'] / seed['steps']:.3f} ms per batched step"
        )
        results[str(threads)] = {"load_average_before": load, "rows": rows, "seed_workload": seed}
    torch.set_num_threads(args.threads[0])
    profile = profile_seed_workload(train_set)
    print(f"\nwhere the engine's training time goes ({args.threads[0]} thread, 10 rounds, s):")
    for name, seconds in profile:
        print(f"  {name:28s} {seconds:7.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "cpu": cpu,
                "cohort": COHORT,
                "by_threads": results,
                "profile_threads": args.threads[0],
                "profile_s": profile,
                "quick": args.quick,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
