"""Plots drawn from record files only (never from live objects), with matplotlib loaded lazily.

Uses ``matplotlib.figure.Figure`` directly (no pyplot), so no GUI backend or global state is
touched and importing fedtorrent stays fast.

What a reader sees stays true to the data: a mean +- std band of a percentage is clipped to
[0, 100] (:func:`clipped_band`) and so is the axis; rounds are whole numbers; heatmaps have one
tick per row and column, labelled with node or peer names and class names, thinned to at most
``MAX_TICK_LABELS`` when there are many, and cell values are written only while they fit, in
black or white by the cell's shade.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtorrent.metrics.records import iter_records, read_json

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_TICK_LABELS = 20
"""A heatmap axis labels at most this many rows or columns (every k-th one past that)."""
MAX_ANNOTATED = 16
"""Cell values are written into heatmaps of at most this many rows and columns."""


def _figure(width: float = 6.4, height: float = 4.2) -> Figure:
    from matplotlib.figure import Figure  # noqa: PLC0415

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    return out


def clipped_band(
    mean: Sequence[float] | np.ndarray,
    std: Sequence[float] | np.ndarray,
    *,
    low: float = 0.0,
    high: float = 100.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``mean - std`` and ``mean + std``, each clipped to ``[low, high]`` (a percentage's range)."""
    centre, spread = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    return np.clip(centre - spread, low, high), np.clip(centre + spread, low, high)


def clamp_ylim(axes: Axes, low: float = 0.0, high: float = 100.0) -> None:
    """Keep the automatic y range of ``axes``, but never past ``[low, high]``."""
    bottom, top = axes.get_ylim()
    axes.set_ylim(max(bottom, low), min(top, high))


def tick_positions(count: int, limit: int = MAX_TICK_LABELS) -> list[int]:
    """Which of ``count`` rows or columns get a labelled tick: all, or every k-th past ``limit``."""
    return list(range(0, count, max(1, math.ceil(count / limit))))


def _names(given: Sequence[Any] | None, count: int) -> list[str]:
    """``given`` as strings when it names every row, else the row numbers ``0..count-1``."""
    if given is not None and len(given) == count:
        return [str(name) for name in given]
    return [str(i) for i in range(count)]


def _heatmap(
    figure: Figure,
    axes: Axes,
    matrix: np.ndarray,
    *,
    names: Sequence[str],
    cmap: str,
    colorbar: str,
    cell: str,
) -> None:
    """Draw a square ``matrix``, shaded from 0 to its maximum, with its ticks and cell values.

    One labelled tick per row and column (thinned past ``MAX_TICK_LABELS``); up to
    ``MAX_ANNOTATED`` rows, each cell's value (``format(value, cell)``) in white on dark shades
    and black on light ones.
    """
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    integer = matrix.dtype.kind in "iu"
    top = float(matrix.max()) if matrix.size else 0.0
    image = axes.imshow(matrix, cmap=cmap, vmin=0.0, vmax=max(top, 1.0 if integer else 1e-9))
    bar = figure.colorbar(image, ax=axes, label=colorbar)
    if integer:
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    count = len(matrix)
    ticks = tick_positions(count)
    shown = [names[i] for i in ticks]
    slanted = max((len(name) for name in shown), default=0) > 3
    axes.set_xticks(
        ticks, shown, rotation=40 if slanted else 0, ha="right" if slanted else "center"
    )
    axes.set_yticks(ticks, shown)
    axes.tick_params(labelsize=8)
    if count > MAX_ANNOTATED:
        return
    size = 7 if count <= 10 else 5.5
    for i in range(count):
        for j in range(count):
            red, green, blue, _ = image.cmap(image.norm(matrix[i, j]))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            axes.text(j, i, format(matrix[i, j], cell), ha="center", va="center", fontsize=size,
                      color="white" if dark else "black")  # fmt: skip


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

    The band and the y axis stay within [0, 100] %. ``reference`` draws dashed horizontal lines
    (e.g. the paper's numbers, in percent).
    """
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    figure = _figure()
    axes = figure.subplots()
    for name, (rounds, mean, std) in sorted(accuracy_curves(records, metric=metric).items()):
        (line,) = axes.plot(rounds, 100 * mean, label=name)
        lower, upper = clipped_band(100 * mean, 100 * std)
        axes.fill_between(rounds, lower, upper, alpha=0.2, color=line.get_color(), linewidth=0)
    for label, value in (reference or {}).items():
        axes.axhline(value, linestyle="--", linewidth=0.8, color="grey")
        axes.annotate(label, (0, value), textcoords="offset points", xytext=(2, 2), fontsize=7)
    clamp_ylim(axes)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
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


def plot_trust(
    trust: Path,
    out: Path,
    *,
    mixing: str | None = None,
    names: Sequence[str] | None = None,
) -> Path | None:
    """Heatmap of the last mixing-weight snapshot: row i is how much node i trusts each node.

    Rows and columns are labelled with ``names`` (one per node), else the snapshot's ``peers``
    (peer ids) when it lists them, else the node numbers. Returns None when the file holds no
    snapshot for ``mixing``.
    """
    snapshot = last_snapshot(trust, mixing=mixing)
    if snapshot is None:
        return None
    weights = np.array(snapshot["weights"], dtype=np.float64)
    given = names if names is not None else snapshot.get("peers")
    title = (
        f"{snapshot.get('mixing')} weights, seed {snapshot.get('seed')}, "
        f"round {snapshot.get('round')}"
    )
    return plot_weights(weights, out, names=given, title=title)


def plot_weights(
    weights: Sequence[Sequence[float]] | np.ndarray,
    out: Path,
    *,
    names: Sequence[Any] | None = None,
    title: str = "",
) -> Path:
    """Heatmap of a mixing-weight matrix: row i is how much node i trusts each node.

    Rows and columns are labelled with ``names`` when it has one per row, else the row numbers.
    """
    matrix = np.asarray(weights, dtype=np.float64)
    figure = _figure(5.2, 4.4)
    axes = figure.subplots()
    _heatmap(
        figure,
        axes,
        matrix,
        names=_names(names, len(matrix)),
        cmap="viridis",
        colorbar="weight",
        cell=".2f",
    )
    axes.set_xlabel("node j (whose parameters)")
    axes.set_ylabel("node i (who mixes)")
    axes.set_title(title)
    return _save(figure, out)


def plot_confusion(
    final: Path,
    out: Path,
    *,
    mixing: str | None = None,
    node: int = 0,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Confusion matrix of one node (first seed found) from ``final.jsonl``.

    Rows and columns are labelled with ``class_names`` (``data.datasets.CLASSES[name]``) when
    it has one name per class, else with the class numbers.
    """
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
    figure = _figure(5.6, 4.8)
    axes = figure.subplots()
    _heatmap(
        figure,
        axes,
        confusion,
        names=_names(class_names, len(confusion)),
        cmap="Blues",
        colorbar="examples",
        cell="d",
    )
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
    limits: tuple[float, float] | None = None,
) -> Path:
    """Lines with error bars: ``series[label] = [(x, mean, std), ...]`` (read from a JSON file).

    With ``limits`` (``(0, 100)`` for a percentage) the error bars and the y axis stay inside.
    """
    figure = _figure()
    axes = figure.subplots()
    for label, points in sorted(series.items()):
        xs, means, stds = (np.array(col, dtype=np.float64) for col in zip(*points, strict=True))
        errors: np.ndarray = stds
        if limits is not None:
            lower, upper = clipped_band(means, stds, low=limits[0], high=limits[1])
            errors = np.stack([means - lower, upper - means])
        axes.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=label)
    if limits is not None:
        clamp_ylim(axes, *limits)
    if logx:
        axes.set_xscale("log", base=2)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, out)


def plot_run_folder(folder: Path) -> list[Path]:
    """Draw every plot a ``fedtorrent simulate`` folder supports into ``folder/plots``.

    Confusion matrices name the classes of the run's dataset (from ``summary.json``'s configs).
    """
    from fedtorrent.config import CLUSTERED_SPLITS  # noqa: PLC0415
    from fedtorrent.data.datasets import CLASSES  # noqa: PLC0415

    folder = Path(folder)
    plots = folder / "plots"
    made = [plot_accuracy(folder / "rounds.jsonl", plots / "accuracy.png")]
    summary = read_json(folder / "summary.json")
    rules = list(summary.get("by_mixing", {}))
    configs = summary.get("configs", [])
    datasets = {str(c.get("data", {}).get("dataset")) for c in configs}
    class_names = CLASSES.get(datasets.pop()) if len(datasets) == 1 else None
    splits = {c.get("data", {}).get("split") for c in configs}
    if splits & {"noniid", "shards", *CLUSTERED_SPLITS}:
        own = "distribution (its cluster's view)" if splits & set(CLUSTERED_SPLITS) else "label mix"
        made.append(
            plot_accuracy(
                folder / "rounds.jsonl",
                plots / "own_accuracy.png",
                metric="own_accuracy",
                title=f"accuracy on each node's own {own}",
            )
        )
    for rule in rules:
        trust = plot_trust(folder / "trust.jsonl", plots / f"trust_{rule}.png", mixing=rule)
        if trust is not None:
            made.append(trust)
        made.append(
            plot_confusion(
                folder / "final.jsonl",
                plots / f"confusion_{rule}.png",
                mixing=rule,
                class_names=class_names,
            )
        )
    return made
