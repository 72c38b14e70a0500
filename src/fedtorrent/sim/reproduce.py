"""``fedtorrent reproduce``: the seed paper's experiments, written beside the paper's numbers.

- Tables 1 and 2: 6 nodes, logistic regression, MNIST and Fashion-MNIST, iid balanced / non-iid
  balanced / iid unbalanced, with no, fixed and learned sharing;
- Table 3: Fashion-MNIST iid, no / fixed / learned sharing (the same runs as Table 2's first row);
- the experiments the paper planned: final accuracy against the number of nodes (6 to 96, random
  cohorts as a tracker hands out) and accuracy against the communication round;
- a centralized reference (``fedtorrent train``'s baseline on the whole training set).

Everything lands in one folder: ``README.md`` (the tables), ``reproduce.json`` (every number and
the time each part took), ``runs/`` (one ``simulate`` folder per setting, with records and plots)
and ``plots/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtorrent.config import (
    BASELINE_TRAIN,
    DataConfig,
    MixingConfig,
    ModelConfig,
    SimConfig,
    TopologyConfig,
    TrainConfig,
)
from fedtorrent.metrics.compare import paired_difference
from fedtorrent.metrics.records import read_json, write_json
from fedtorrent.sim.run import simulate

if TYPE_CHECKING:
    from fedtorrent.data.datasets import Dataset

Log = Callable[[str], None]
_SIM = SimConfig()
"""``fedtorrent simulate``'s defaults: the settings the tables are reproduced with."""

PAPER: dict[str, dict[str, tuple[float, float]]] = {
    "mnist": {"iid": (92.0, 0.03), "noniid": (91.1, 0.08), "unbalanced": (92.1, 0.04)},
    "fashion-mnist": {"iid": (84.2, 0.10), "noniid": (82.7, 0.07), "unbalanced": (83.4, 0.12)},
}
"""Tables 1 and 2 of the seed paper: (mean accuracy %, std) per split."""
PAPER_TABLE3: dict[str, tuple[float, float]] = {
    "none": (83.2, 0.20),
    "fixed": (84.1, 0.10),
    "learned": (84.2, 0.10),
}
"""Table 3 of the seed paper (Fashion-MNIST): sharing scheme -> (mean accuracy %, std)."""
SPLIT_NAMES = {
    "iid": "iid balanced",
    "noniid": "non-iid balanced",
    "unbalanced": "iid unbalanced",
}


@dataclass(frozen=True)
class ReproducePlan:
    """What ``reproduce`` runs; the defaults are the committed ``results/``."""

    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = _SIM.rounds
    round_schedule: str = _SIM.round_schedule
    num_nodes: int = 6
    train: TrainConfig = _SIM.train
    mixing: MixingConfig = _SIM.mixing
    datasets: tuple[str, ...] = ("mnist", "fashion-mnist")
    """Table 1's and Table 2's datasets (tests swap in ``digits``)."""
    splits: tuple[str, ...] = ("iid", "noniid", "unbalanced")
    rules: tuple[str, ...] = ("none", "fixed", "learned")
    sweep_dataset: str = "fashion-mnist"
    sweep_nodes: tuple[int, ...] = (6, 12, 24, 48, 96)
    sweep_seeds: tuple[int, ...] = (0, 1)
    sweep_topology: TopologyConfig = field(
        default_factory=lambda: TopologyConfig(kind="random_cohort", degree=5)
    )
    centralized: bool = True

    @classmethod
    def quick(cls) -> ReproducePlan:
        """A few rounds, one seed, two sweep sizes: checks the pipeline in about a minute."""
        return cls(seeds=(0,), rounds=3, sweep_nodes=(6, 12), sweep_seeds=(0,), centralized=False)

    def with_seeds(self, seeds: tuple[int, ...]) -> ReproducePlan:
        """The same plan on other seeds (the sweep uses the first two)."""
        return replace(self, seeds=seeds, sweep_seeds=seeds[:2])

    def config(self, dataset: str, split: str, rule: str, *, data_dir: Path | None) -> SimConfig:
        """The simulate config of one table cell (seed 0; see ``SimConfig.with_seed``)."""
        return SimConfig(
            data=DataConfig(
                dataset=dataset, data_dir=data_dir, num_nodes=self.num_nodes, split=split
            ),
            model=ModelConfig(name="logreg"),
            train=self.train,
            mixing=replace(self.mixing, rule=rule),
            rounds=self.rounds,
            round_schedule=self.round_schedule,
        )


def render(out: Path) -> Path:
    """Redraw ``out/plots/nodes.png`` and rewrite ``out/README.md`` from ``out/reproduce.json``."""
    out = Path(out)
    _plot_sweep(out)
    report = out / "README.md"
    report.write_text(render_report(read_json(out / "reproduce.json")), encoding="utf-8")
    return report


def reproduce(
    plan: ReproducePlan, *, out: Path, data_dir: Path | None = None, log: Log | None = None
) -> Path:
    """Run ``plan`` into ``out`` and return the path of the markdown report."""
    say = log or (lambda _message: None)
    out = Path(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    tables: dict[str, dict[str, Any]] = {}
    for dataset_name in plan.datasets:
        dataset = _load(dataset_name, data_dir)
        for split in plan.splits:
            tick = time.perf_counter()
            folder = out / "runs" / f"{dataset_name}-{split}"
            _fresh(folder)
            configs = [
                plan.config(dataset_name, split, rule, data_dir=data_dir).with_seed(seed)
                for rule in plan.rules
                for seed in plan.seeds
            ]
            say(f"{dataset_name} {split}: {len(configs)} runs")
            _, summary = simulate(configs, out_dir=folder, dataset=dataset)
            tables.setdefault(dataset_name, {})[split] = summary["by_mixing"]
            timings[f"{dataset_name}-{split}"] = time.perf_counter() - tick
    sweep = _sweep(plan, out=out, data_dir=data_dir, say=say, timings=timings)
    centralized = _centralized(plan, data_dir=data_dir, say=say, timings=timings)
    timings["total"] = time.perf_counter() - started
    record = {
        "plan": _plan_dict(plan),
        "tables": tables,
        "sweep": sweep,
        "centralized": centralized,
        "paper": {"tables": PAPER, "table3": PAPER_TABLE3},
        "seconds": timings,
    }
    write_json(out / "reproduce.json", record)
    report = render(out)
    say(f"done in {timings['total']:.0f} s; report in {report}")
    return report


def _load(name: str, data_dir: Path | None) -> Dataset:
    from fedtorrent.data.datasets import load_dataset  # noqa: PLC0415

    return load_dataset(name, data_dir=data_dir, progress=False)


def _fresh(folder: Path) -> None:
    """Remove the record files a previous run left, so records are not appended twice."""
    for name in ("rounds", "final", "trust"):
        for suffix in (".jsonl", ".csv"):
            (folder / f"{name}{suffix}").unlink(missing_ok=True)


def _sweep(
    plan: ReproducePlan, *, out: Path, data_dir: Path | None, say: Log, timings: dict[str, float]
) -> dict[str, Any]:
    """Final accuracy against the number of nodes, for every rule."""
    if not plan.sweep_nodes:
        return {}
    dataset = _load(plan.sweep_dataset, data_dir)
    points: dict[str, list[list[float]]] = {}
    for nodes in plan.sweep_nodes:
        tick = time.perf_counter()
        folder = out / "runs" / f"sweep-{plan.sweep_dataset}-n{nodes:03d}"
        _fresh(folder)
        configs = []
        for rule in plan.rules:
            base = plan.config(plan.sweep_dataset, "iid", rule, data_dir=data_dir)
            base = replace(
                base,
                data=replace(base.data, num_nodes=nodes),
                topology=plan.sweep_topology,
                eval_every=plan.rounds,
            )
            configs += [base.with_seed(seed) for seed in plan.sweep_seeds]
        say(f"sweep {nodes} nodes: {len(configs)} runs")
        _, summary = simulate(configs, out_dir=folder, dataset=dataset, plots=False)
        for rule, row in summary["by_mixing"].items():
            points.setdefault(rule, []).append(
                [nodes, 100 * row["accuracy_mean"], 100 * row["accuracy_std"]]
            )
        timings[f"sweep-n{nodes}"] = time.perf_counter() - tick
    return {
        "dataset": plan.sweep_dataset,
        "topology": {"kind": plan.sweep_topology.kind, "degree": plan.sweep_topology.degree},
        "points": points,
    }


def _centralized(
    plan: ReproducePlan, *, data_dir: Path | None, say: Log, timings: dict[str, float]
) -> dict[str, Any]:
    """``fedtorrent train``'s baseline (one model, all training data) on every table dataset."""
    if not plan.centralized:
        return {}
    from fedtorrent.training.evaluate import train_centralized  # noqa: PLC0415

    results: dict[str, Any] = {}
    for name in plan.datasets:
        tick = time.perf_counter()
        dataset = _load(name, data_dir)
        accuracies = []
        for seed in plan.seeds:
            say(f"centralized {name} seed {seed}")
            _, metrics = train_centralized(
                dataset,
                ModelConfig(name="logreg"),
                replace(BASELINE_TRAIN, seed=seed),
                progress=False,
            )
            accuracies.append(100 * metrics.accuracy)
        mean = sum(accuracies) / len(accuracies)
        std = (sum((a - mean) ** 2 for a in accuracies) / len(accuracies)) ** 0.5
        results[name] = {"accuracy_mean": mean, "accuracy_std": std, "runs": accuracies}
        timings[f"centralized-{name}"] = time.perf_counter() - tick
    return results


def _plan_dict(plan: ReproducePlan) -> dict[str, Any]:
    from dataclasses import asdict  # noqa: PLC0415

    return asdict(plan)


def _plot_sweep(out: Path) -> None:
    from fedtorrent.metrics.plots import plot_lines  # noqa: PLC0415

    sweep = read_json(out / "reproduce.json").get("sweep") or {}
    if sweep.get("points"):
        plot_lines(
            sweep["points"],
            out / "plots" / "nodes.png",
            xlabel="nodes",
            ylabel="final test accuracy (%)",
            title=(
                f"{sweep['dataset']}: accuracy vs nodes "
                f"({sweep['topology']['kind']}, {sweep['topology']['degree']} peers)"
            ),
            logx=True,
            limits=(0.0, 100.0),
        )


# ----------------------------------------------------------------------------------------------
# The markdown report, rendered from reproduce.json only


def _cell(row: dict[str, Any] | None, key: str = "accuracy") -> str:
    if row is None:
        return "–"
    return f"{100 * row[f'{key}_mean']:.2f} ± {100 * row[f'{key}_std']:.2f}"


def _verdict(ours: float, paper: float) -> str:
    return f"{ours - paper:+.2f} {'✓' if ours >= paper - 1e-9 else '✗'}"


def render_report(record: dict[str, Any]) -> str:
    """The markdown tables of a ``reproduce.json`` record."""
    plan, tables = record["plan"], record["tables"]
    seconds = record["seconds"]
    rules = plan["rules"]
    train = plan["train"]
    schedule = {"cosine": "cosine-decayed across rounds", "constant": "constant"}
    within = " (and cosine within each round)" if train["lr_schedule"] == "cosine" else ""
    lines = [
        "# Reproducing the seed paper",
        "",
        "Produced by `fedtorrent reproduce` "
        f"(seeds {', '.join(map(str, plan['seeds']))}; {plan['num_nodes']} nodes, complete "
        f"graph, logistic regression; {plan['rounds']} rounds of {train['epochs']} local "
        f"epoch, batch {train['batch_size']}, {train['optimizer']} with lr {train['lr']} "
        f"{schedule.get(plan['round_schedule'], plan['round_schedule'])}{within}; learned "
        f"trust: plain SGD on the logits, lr {plan['mixing']['trust_lr']}, "
        f"{plan['mixing']['trust_steps']} steps per round). "
        f"It took **{seconds['total'] / 60:.1f} minutes** on this machine's 2 shared CPU cores.",
        "",
        "Cells are mean ± std of final test accuracy (%) over every node and seed. The paper "
        "does not say what its std is over; ours pools nodes and seeds (with fixed sharing on a "
        "complete graph all nodes end equal, so its std is the spread across seeds). "
        "**vs paper** compares the best sharing mode (fixed or learned) with the paper.",
        "",
    ]
    for number, name in enumerate(plan["datasets"], start=1):
        if name in tables:
            lines += _table12(number, name, tables[name], rules, record.get("centralized", {}))
    if "fashion-mnist" in tables and "iid" in tables["fashion-mnist"]:
        lines += _table3(tables["fashion-mnist"]["iid"])
    lines += _sweep_section(record.get("sweep") or {})
    lines += _rounds_section(plan)
    lines += ["## Time", "", "| part | seconds |", "|---|---:|"]
    lines += [f"| {part} | {value:.1f} |" for part, value in seconds.items()]
    lines.append("")
    return "\n".join(lines)


def _table12(
    number: int,
    name: str,
    table: dict[str, Any],
    rules: list[str],
    centralized: dict[str, Any],
) -> list[str]:
    paper = PAPER.get(name, {})
    lines = [
        f"## Table {number}: {name}",
        "",
        "| split | paper | " + " | ".join(rules) + " | vs paper |",
        "|---|---:|" + "---:|" * len(rules) + "---:|",
    ]
    for split, by_rule in table.items():
        sharing = [by_rule[r]["accuracy_mean"] * 100 for r in ("fixed", "learned") if r in by_rule]
        reference, verdict = "–", "–"
        if split in paper:
            mean, std = paper[split]
            reference = f"{mean:.1f} ± {std:.2f}"
            verdict = _verdict(max(sharing), mean) if sharing else "–"
        lines.append(
            f"| {SPLIT_NAMES.get(split, split)} | {reference} | "
            + " | ".join(_cell(by_rule.get(r)) for r in rules)
            + f" | {verdict} |"
        )
        if split in ("noniid", "shards"):
            lines.append(
                "| ↳ accuracy on each node's own label mix | – | "
                + " | ".join(_cell(by_rule.get(r), "own_accuracy") for r in rules)
                + " | |"
            )
    if name in centralized:
        row = centralized[name]
        lines.append(
            f"\nCentralized reference (one model on all 60,000 training images, "
            f"`fedtorrent train` defaults): **{row['accuracy_mean']:.2f} ± "
            f"{row['accuracy_std']:.2f}** over seeds."
        )
    return [*lines, ""]


def _table3(by_rule: dict[str, Any]) -> list[str]:
    lines = [
        "## Table 3: fashion-mnist, sharing schemes (iid balanced)",
        "",
        "| sharing | paper | ours | vs paper |",
        "|---|---:|---:|---:|",
    ]
    names = {"none": "no sharing", "fixed": "fixed sharing", "learned": "learned sharing"}
    for rule, (mean, std) in PAPER_TABLE3.items():
        row = by_rule.get(rule)
        ours = "–" if row is None else _verdict(100 * row["accuracy_mean"], mean)
        lines.append(f"| {names[rule]} | {mean:.1f} ± {std:.2f} | {_cell(row)} | {ours} |")
    if all(r in by_rule for r in ("none", "fixed", "learned")):
        none, fixed, learned = (by_rule[r]["accuracy_mean"] for r in ("none", "fixed", "learned"))
        ordered = learned >= fixed > none
        spread = " / ".join(
            f"{100 * by_rule[r]['accuracy_std_seeds']:.2f}" for r in ("none", "fixed", "learned")
        )
        lines.append(
            f"\nOrder learned >= fixed > none: **{'holds' if ordered else 'does not hold'}** "
            f"({100 * learned:.2f} / {100 * fixed:.2f} / {100 * none:.2f}); the std of the "
            f"node mean across seeds is {spread} (none / fixed / learned)."
        )
        lines += _paired_line(by_rule)
    return [*lines, ""]


def _paired_line(by_rule: dict[str, Any]) -> list[str]:
    """Learned minus fixed seed by seed (same split, model and batches), when there are seeds."""
    learned, fixed = by_rule["learned"], by_rule["fixed"]
    if (
        "accuracy_per_seed" not in learned
        or learned.get("seeds") != fixed.get("seeds")
        or len(learned["seeds"]) < 2
    ):
        return []
    pair = paired_difference(
        [100 * v for v in learned["accuracy_per_seed"]],
        [100 * v for v in fixed["accuracy_per_seed"]],
    )
    told = "cannot be told apart from 0" if pair["low"] <= 0 <= pair["high"] else "is not 0"
    return [
        f"Seed by seed, learned - fixed is {pair['mean']:+.3f} points, 95% interval "
        f"[{pair['low']:+.3f}, {pair['high']:+.3f}] over {len(learned['seeds'])} seeds: it "
        f"{told}. [table3_seeds.md](table3_seeds.md) (`python experiments/table3_seeds.py`) "
        "repeats this on 12 seeds."
    ]


def _sweep_section(sweep: dict[str, Any]) -> list[str]:
    points = sweep.get("points") or {}
    if not points:
        return []
    rules = sorted(points)
    sizes = sorted({int(p[0]) for rows in points.values() for p in rows})
    lines = [
        f"## Accuracy against the number of nodes ({sweep['dataset']}, iid)",
        "",
        f"Each node mixes with a fresh random cohort of {sweep['topology']['degree']} peers each "
        "round (what the tracker hands out); the training set is split evenly, so more nodes "
        "means less data per node.",
        "",
        "| nodes | " + " | ".join(rules) + " |",
        "|---:|" + "---:|" * len(rules),
    ]
    for size in sizes:
        cells = []
        for rule in rules:
            match = [p for p in points[rule] if int(p[0]) == size]
            cells.append(f"{match[0][1]:.2f} ± {match[0][2]:.2f}" if match else "–")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return [*lines, "", "![accuracy vs nodes](plots/nodes.png)", ""]


def _rounds_section(plan: dict[str, Any]) -> list[str]:
    lines = [
        "## Accuracy against the communication round",
        "",
        "Mean ± std over nodes and seeds, per sharing mode; each run folder under `runs/` holds "
        "the per-round, per-node records these are drawn from, confusion matrices and trust "
        "heatmaps.",
        "",
    ]
    for dataset in plan["datasets"]:
        for split in plan["splits"]:
            path = f"runs/{dataset}-{split}/plots/accuracy.png"
            lines.append(f"![{dataset} {split}]({path})")
    return [*lines, ""]
