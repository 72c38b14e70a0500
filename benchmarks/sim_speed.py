"""Time per simulated round against the number of nodes: vectorized engine vs a plain loop.

One round = every node trains one local epoch on its share of the MNIST training set (the whole
set is split evenly, so the arithmetic per round is the same for every N), then mixes with a fresh
random cohort of 4 peers (fixed weights). The plain loop does the same work the obvious way: N
separate ``nn.Module``s, each with its own ``torch.optim.SGD``, batches gathered by fancy
indexing, and mixing by summing state dicts node by node.

First, the product itself on the seed workload W (MNIST, 6 nodes, logistic regression, 10 rounds
of 1 local epoch, SGD lr 0.1, batch 64, complete graph, fixed mixing, all 60,000 training
images): the ``fedtorrent simulate`` command timed from outside the process, alternating with
``python -c "import torch"`` (the floor of any torch tool) and with a plain PyTorch script doing
the same work (``benchmarks/plain_seed.py``), medians of 5; then where the time goes, from the
public ``simulate()`` in a fresh process (process start, imports, data, training, mixing,
evaluation, the rest of the run, writing). Also profiles the engine's training on W.

    FEDTORRENT_DATA=../shared/data .venv/bin/python benchmarks/sim_speed.py [--quick] [--only PART]

Prints tables and writes ``benchmarks/results/sim_speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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
HERE = Path(__file__).resolve().parent
W_ARGS = [
    *("--dataset", "mnist", "--model", "logreg", "--nodes", "6", "--mixing", "fixed"),
    *("--rounds", "10", "--round-schedule", "constant", "--lr", "0.1", "--batch-size", "64"),
    *("--val-fraction", "0", "--seed", "0", "--no-plots", "--no-progress"),
]


def _seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - start


def product(repeats: int) -> dict:
    """W through ``fedtorrent simulate`` beside ``import torch`` and a plain script, alternating."""
    python = sys.executable
    fedtorrent = str(Path(python).with_name("fedtorrent"))
    runs: dict[str, list[float]] = {"import_torch_s": [], "simulate_s": [], "plain_s": []}
    train, inside = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w"
        _seconds([fedtorrent, "simulate", *W_ARGS, "--out", str(out)])  # warms the cache
        for _ in range(repeats):
            runs["import_torch_s"].append(_seconds([python, "-c", "import torch"]))
            runs["simulate_s"].append(
                _seconds([fedtorrent, "simulate", *W_ARGS, "--out", str(out)])
            )
            fixed = json.loads((out / "summary.json").read_text())["by_mixing"]["fixed"]
            train.append(fixed["timings"]["train"])
            inside.append(fixed["wall_seconds"])
            runs["plain_s"].append(_seconds([python, str(HERE / "plain_seed.py")]))
        child = [python, str(HERE / "w_phases.py")]
        phases = json.loads(
            subprocess.run(child, check=True, capture_output=True, text=True, timeout=600).stdout
        )
    phases = {"process_start": min(_seconds([python, "-c", "pass"]) for _ in range(3)), **phases}
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {
        **medians,
        "over_import_torch_s": medians["simulate_s"] - medians["import_torch_s"],
        "train_s": statistics.median(train),
        "run_s": statistics.median(inside),
        "plain_over_simulate": medians["plain_s"] / medians["simulate_s"],
        "runs": runs,
        "train_s_all": train,
        "phases_s": phases,
        "accuracy": fixed["accuracy_mean"],
    }


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


def profile_seed_workload() -> list[tuple[str, float]]:
    """Self CPU time of the top operators in W's training loop, through the product's path."""
    from torch.profiler import ProfilerActivity, profile

    import fedtorrent as ft

    config = ft.SimConfig(
        data=ft.DataConfig(dataset="mnist", num_nodes=6, val_fraction=0.0),
        train=ft.TrainConfig(lr=0.1, batch_size=64),
        mixing=ft.MixingConfig(rule="fixed"),
        rounds=10,
        round_schedule="constant",
    )
    data = load_dataset("mnist", progress=False)
    ft.simulate(config, dataset=data, plots=False, progress=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ft.simulate(config, dataset=data, plots=False, progress=False)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) / 1e6
    top = [(e.key, e.self_cpu_time_total / 1e6) for e in rows[:8]]
    return [("all aten ops", total), *top]


def cnn_batching(threads: int) -> dict:
    """Why batching nodes cannot make the CNN much faster: its step is compute-bound.

    One CNN's SGD step per example at batch 16, 64 and 384 (flat: the kernels are as efficient
    at 64 as at 384), and one step of 6 nodes at batch 64 as ``vmap`` over ``functional_call``
    (one grouped convolution per layer) against 6 separate modules.
    """
    from torch.func import functional_call, grad, vmap

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape, nodes = (1, 28, 28), 6

    def best(fn, repeats: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    per_example = {}
    for batch in (16, 64, 384):
        net = build_model("cnn", input_shape=shape, num_classes=10)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        x, y = torch.rand(batch, *shape), torch.randint(0, 10, (batch,))

        def step(net=net, opt=opt, x=x, y=y) -> None:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

        per_example[str(batch)] = best(step, max(3, 768 // batch)) / batch * 1e6
    nets = [build_model("cnn", input_shape=shape, num_classes=10) for _ in range(nodes)]
    xs, ys = torch.rand(nodes, 64, *shape), torch.randint(0, 10, (nodes, 64))

    def separate() -> None:
        for net, x, y in zip(nets, xs, ys, strict=True):
            net.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()

    stacked = {k: torch.stack([dict(n.named_parameters())[k] for n in nets]).detach()
               for k, _ in nets[0].named_parameters()}  # fmt: skip

    def loss(params, x, y):
        return nn.functional.cross_entropy(functional_call(nets[0], params, (x,)), y)

    batched = vmap(grad(loss))
    return {
        "threads": threads,
        "us_per_example_by_batch": per_example,
        "six_nodes_separate_s": best(separate, 5),
        "six_nodes_vmap_s": best(lambda: batched(stacked, xs, ys), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, rounds and repeats")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time"
    )
    parser.add_argument("--only", choices=("product", "engine"), help="one part only")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    cpu = platform.processor() or platform.machine()
    report: dict = {"torch": torch.__version__, "cpu": cpu, "cohort": COHORT, "quick": args.quick}
    if args.out.exists():  # a part run alone keeps the other part's last figures
        report = {**json.loads(args.out.read_text()), **report}
    if args.only in (None, "product"):
        w = product(repeats=3 if args.quick else 5)
        report["product"] = w
        print(
            f"W end to end, medians of {len(w['runs']['simulate_s'])} alternating runs: "
            f"python -c 'import torch' {w['import_torch_s']:.2f} s, fedtorrent simulate "
            f"{w['simulate_s']:.2f} s (+{w['over_import_torch_s']:.2f} s), plain PyTorch "
            f"script {w['plain_s']:.2f} s ({w['plain_over_simulate']:.1f}x the product's time); "
            f"training loop inside simulate {w['train_s']:.3f} s; accuracy {w['accuracy']:.4f}"
        )
        print("where W's time goes (public simulate() in a fresh process, s):")
        for name, seconds in w["phases_s"].items():
            print(f"  {name:12s} {seconds:7.3f}")
        profile = profile_seed_workload()
        report["profile_s"] = profile
        print("\nW's top operators (torch profiler, self CPU s):")
        for name, seconds in profile:
            print(f"  {name:28s} {seconds:7.3f}")
    if args.only in (None, "engine"):
        mnist = load_dataset("mnist", progress=False)
        train_set = subset(mnist, 48_000)
        if args.quick:
            linear_sizes, cnn_sizes, rounds = [6, 100], [6], 2
        else:
            linear_sizes, cnn_sizes, rounds = [6, 10, 30, 100, 300, 1000], [6, 30, 100], 4
        results: dict[str, dict] = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            load = os.getloadavg()[0]
            print(f"\ntorch {torch.__version__}, {threads} thread(s), {cpu}, load {load:.2f}")
            print("round times are the best of the timed rounds (least disturbed by others)")
            header = ("model", "nodes", "round_s", "train_s", "mix_s", "loop_s", "speedup")
            print(f"{header[0]:7s} " + " ".join(f"{h:>9s}" for h in header[1:]))
            rows = sweep(train_set, "logreg", linear_sizes, rounds, loop_limit=1000)
            # The CNN costs ~18 MFLOP per example: a 6,000-image subset keeps a round near 1 s.
            cnn = subset(mnist, 6_000)
            rows += sweep(cnn, "cnn", cnn_sizes, max(1, rounds - 2), loop_limit=1000)
            batching = cnn_batching(threads)
            per = batching["us_per_example_by_batch"]
            print(
                "cnn step per example at batch "
                + ", ".join(f"{b}: {us:.0f} us" for b, us in per.items())
                + f"; 6 nodes x batch 64: vmap (grouped convolutions) "
                f"{batching['six_nodes_vmap_s'] * 1e3:.1f} ms, 6 separate modules "
                f"{batching['six_nodes_separate_s'] * 1e3:.1f} ms"
            )
            results[str(threads)] = {"load_average_before": load, "rows": rows,
                                     "cnn_batching": batching}  # fmt: skip
        report["by_threads"] = results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
