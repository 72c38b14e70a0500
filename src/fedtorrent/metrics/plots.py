"""Plots drawn from record files only (never from live objects), with matplotlib loaded lazily.

Uses ``matplotlib.figure.Figure`` directly (no pyplot), so no GUI backend or global state is
touched and importing fedtorrent stays fast.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtorrent.metrics.records import iter_records, read_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float = 6.4, height: float = 4.2) -> Figure:
    from matplotlib.figure import Figure  # noqa: PLC0415

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    return out


def accuracy_curves(
    records: Path, *, metric: str = "test_accuracy", group: str = "mixing"
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per group (mixing rule): rounds, mean and std of ``metric`` over every node and seed.

    Records whose ``metric`` is null are skipped.
    """
    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in iter_records(records):
        value = record.get(metric)
        if value is None:
            continue
        values[str(record.get(group))][int(record["round"])].append(float(value))
    curves = {}
    for name, by_round in values.items():
        rounds = np.array(sorted(by_round))
        stacked = [np.array(by_round[r]) for r in rounds]
        curves[name] = (
            rounds,
            np.array([v.mean() for v in stacked]),
            np.array([v.std() for v in stacked]),
        )
    return curves


def plot_accuracy(
    records: Path,
    out: Path,
    *,
    metric: str = "test_accuracy",
    title: str | None = None,
    reference: Mapping[str, float] | None = None,
) -> Path:
    """Accuracy against round, one line per mixing rule with a mean +- std band over nodes/seeds.

    ``reference`` draws dashed horizontal lines (e.g. the paper's numbers, in percent).
    """
    figure = _figure()
    axes = figure.subplots()
    for name, (rounds, mean, std) in sorted(accuracy_curves(records, metric=metric).items()):
        axes.plot(rounds, 100 * mean, label=name)
        axes.fill_between(rounds, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
    for label, value in (reference or {}).items():
        axes.axhline(value, linestyle="--", linewidth=0.8, color="grey")
        axes.annotate(label, (0, value), textcoords="offset points", xytext=(2, 2), fontsize=7)
    axes.set_xlabel("communication round")
    axes.set_ylabel(metric.replace("_", " ") + " (%)")
    axes.set_title(title or metric.replace("_", " "))
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, out)


def last_snapshot(trust: Path, *, mixing: str | None = None) -> dict[str, Any] | None:
    """The last weights snapshot in a ``trust.jsonl`` file (optionally of one mixing rule)."""
    found = None
    for record in iter_records(trust):
        if mixing is None or record.get("mixing") == mixing:
            found = record
    return found


def plot_trust(trust: Path, out: Path, *, mixing: str | None = None) -> Path | None:
    """Heatmap of the last mixing-weight snapshot: row i is how much node i trusts each node.

    Returns None when the file holds no snapshot for ``mixing``.
    """
    snapshot = last_snapshot(trust, mixing=mixing)
    if snapshot is None:
        return None
    weights = np.array(snapshot["weights"], dtype=np.float64)
    figure = _figure(5.2, 4.4)
    axes = figure.subplots()
    image = axes.imshow(weights, cmap="viridis", vmin=0.0, vmax=max(1e-9, float(weights.max())))
    figure.colorbar(image, ax=axes, label="weight")
    n = len(weights)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                axes.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", fontsize=7)
    axes.set_xlabel("node j (whose parameters)")
    axes.set_ylabel("node i (who mixes)")
    axes.set_title(
        f"{snapshot.get('mixing')} weights, seed {snapshot.get('seed')}, "
        f"round {snapshot.get('round')}"
    )
    return _save(figure, out)


def plot_confusion(final: Path, out: Path, *, mixing: str | None = None, node: int = 0) -> Path:
    """Confusion matrix of one node (first seed found) from ``final.jsonl``."""
    record = next(
        (
            r
            for r in iter_records(final)
            if r.get("node") == node and (mixing is None or r.get("mixing") == mixing)
        ),
        None,
    )
    if record is None:
        raise FileNotFoundError(f"no final record for node {node} ({mixing}) in {final}")
    confusion = np.array(record["confusion"], dtype=np.int64)
    figure = _figure(5.2, 4.4)
    axes = figure.subplots()
    image = axes.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axes, label="examples")
    for i in range(len(confusion)):
        for j in range(len(confusion)):
            axes.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"{record.get('mixing')}: node {node}, seed {record.get('seed')}")
    return _save(figure, out)


def plot_lines(
    series: Mapping[str, Sequence[Sequence[float]]],
    out: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> Path:
    """Lines with error bars: ``series[label] = [(x, mean, std), ...]`` (read from a JSON file)."""
    figure = _figure()
    axes = figure.subplots()
    for label, points in sorted(series.items()):
        xs, means, stds = (np.array(col, dtype=np.float64) for col in zip(*points, strict=True))
        axes.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    if logx:
        axes.set_xscale("log", base=2)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, out)


def plot_run_folder(folder: Path) -> list[Path]:
    """Draw every plot a ``fedtorrent simulate`` folder supports into ``folder/plots``."""
    folder = Path(folder)
    plots = folder / "plots"
    made = [plot_accuracy(folder / "rounds.jsonl", plots / "accuracy.png")]
    summary = read_json(folder / "summary.json")
    rules = list(summary.get("by_mixing", {}))
    configs = summary.get("configs", [])
    if any(c.get("data", {}).get("split") in ("noniid", "shards") for c in configs):
        made.append(
            plot_accuracy(
                folder / "rounds.jsonl",
                plots / "own_accuracy.png",
                metric="own_accuracy",
                title="accuracy on each node's own label mix",
            )
        )
    for rule in rules:
        trust = plot_trust(folder / "trust.jsonl", plots / f"trust_{rule}.png", mixing=rule)
        if trust is not None:
            made.append(trust)
        made.append(
            plot_confusion(folder / "final.jsonl", plots / f"confusion_{rule}.png", mixing=rule)
        )
    return made
