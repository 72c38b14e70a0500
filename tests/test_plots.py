"""Plots as a reader sees them, drawn from small record files and checked through matplotlib.

Each plot is drawn into a temporary folder; the figure is caught on its way to the file, so the
checks read the real artists: the band's polygon, the axis limits, tick positions and labels,
the colour of cell values.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedtorrent.data.datasets import CLASSES
from fedtorrent.metrics import plots

pytest.importorskip("matplotlib")


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Figures by file name, as ``plots._save`` writes them (the files are written too)."""
    figures: dict[str, Any] = {}
    save = plots._save

    def keep(figure: Any, out: Path) -> Path:
        figures[Path(out).name] = figure
        path = save(figure, out)
        assert path.stat().st_size > 1000
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield figures


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def band_heights(axes: Any) -> np.ndarray:
    """The y of every vertex of every filled band on ``axes``."""
    return np.concatenate(
        [path.vertices[:, 1] for band in axes.collections for path in band.get_paths()]
    )


def labels(ticks: Any) -> list[str]:
    return [tick.get_text() for tick in ticks]


def test_the_accuracy_band_stays_between_0_and_100(tmp_path: Path, drawn: dict[str, Any]) -> None:
    # Per round, three nodes: near 100 % the std band would reach past 100, near 0 below 0.
    records = [
        {"mixing": rule, "round": r, "node": n, "test_accuracy": value}
        for r in range(1, 6)
        for rule, values in (("high", (1.0, 1.0, 0.5)), ("low", (0.0, 0.0, 0.4)))
        for n, value in enumerate(values)
    ]
    plots.plot_accuracy(write_jsonl(tmp_path / "rounds.jsonl", records), tmp_path / "a.png")
    axes = drawn["a.png"].axes[0]
    heights = band_heights(axes)
    assert heights.min() == 0.0 and heights.max() == 100.0  # reached, and clipped there
    bottom, top = axes.get_ylim()
    assert 0.0 <= bottom < top <= 100.0
    assert all(float(x).is_integer() for x in axes.get_xticks())  # whole rounds


def test_the_swarm_accuracy_band_stays_between_0_and_100(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from fedtorrent.node import swarm

    rounds = [
        {"node": n, "round": r, "test_accuracy": value}
        for r in (1, 2, 3)
        for n, value in enumerate((1.0, 1.0, 0.4))
    ]
    write_jsonl(tmp_path / "rounds.jsonl", rounds)
    bandwidth = {"central_server_bytes": 10, "p2p_bytes_sent": 20, "tracker_bytes": 5}
    (tmp_path / "summary.json").write_text(
        json.dumps({"session": "s", "peers": 3, "per_peer": [], "bandwidth": bandwidth})
    )
    figures: list[Any] = []
    original = Figure.savefig

    def keep(self: Any, *args: Any, **kwargs: Any) -> None:
        figures.append(self)
        original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", keep)
        swarm.plot_swarm(tmp_path)
    axes = figures[0].axes[0]  # accuracy.png comes first
    heights = band_heights(axes)
    assert heights.max() == 100.0 and heights.min() > 0.0
    assert axes.get_ylim()[1] <= 100.0


def trust_snapshot(n: int, **extra: Any) -> dict[str, Any]:
    weights = np.full((n, n), 0.5 / (n - 1))
    np.fill_diagonal(weights, 0.5)
    weights[0] = np.eye(n)[0] * 0.9 + 0.1 / n  # one bright cell, the rest dark
    return {"mixing": "learned", "seed": 0, "round": 3, "weights": weights.tolist(), **extra}


def test_the_trust_heatmap_names_every_peer_with_readable_values(
    tmp_path: Path, drawn: dict[str, Any]
) -> None:
    peers = [f"peer-{i}" for i in range(6)]
    trust = write_jsonl(tmp_path / "trust.jsonl", [trust_snapshot(6, peers=peers)])
    plots.plot_trust(trust, tmp_path / "t.png")
    axes = drawn["t.png"].axes[0]
    assert list(axes.get_xticks()) == list(range(6)) == list(axes.get_yticks())
    assert labels(axes.get_xticklabels()) == peers == labels(axes.get_yticklabels())
    cells = {(text.get_position(), text.get_text()): text.get_color() for text in axes.texts}
    assert len(cells) == 36
    assert cells[((0, 0), "0.92")] == "black"  # the brightest viridis cell
    assert cells[((1, 0), "0.02")] == "white"  # a dark one
    # Without names: the node numbers, as integer ticks.
    plain = write_jsonl(tmp_path / "plain.jsonl", [trust_snapshot(6)])
    plots.plot_trust(plain, tmp_path / "p.png")
    assert labels(drawn["p.png"].axes[0].get_xticklabels()) == [str(i) for i in range(6)]


def test_a_heatmap_of_many_nodes_thins_its_ticks_and_drops_cell_values(
    tmp_path: Path, drawn: dict[str, Any]
) -> None:
    trust = write_jsonl(tmp_path / "trust.jsonl", [trust_snapshot(100)])
    plots.plot_trust(trust, tmp_path / "many.png")
    axes = drawn["many.png"].axes[0]
    ticks = list(axes.get_xticks())
    assert ticks == plots.tick_positions(100) == list(range(0, 100, 5))
    assert labels(axes.get_xticklabels()) == [str(t) for t in ticks]
    assert len(axes.texts) == 0


def final_record(classes: int, **extra: Any) -> dict[str, Any]:
    confusion = np.diag(np.arange(100, 100 + 7 * classes, 7))
    confusion[0, 1] = 3
    return {"mixing": "fixed", "seed": 0, "node": 0, "confusion": confusion.tolist(), **extra}


def test_the_confusion_matrix_names_the_classes_with_integer_ticks(
    tmp_path: Path, drawn: dict[str, Any]
) -> None:
    final = write_jsonl(tmp_path / "final.jsonl", [final_record(10)])
    names = CLASSES["fashion-mnist"]
    plots.plot_confusion(final, tmp_path / "c.png", class_names=names)
    figure = drawn["c.png"]
    axes, colorbar = figure.axes
    assert list(axes.get_xticks()) == list(range(10)) == list(axes.get_yticks())
    assert labels(axes.get_xticklabels()) == list(names) == labels(axes.get_yticklabels())
    assert all(float(t).is_integer() for t in colorbar.get_yticks())  # counts are whole
    texts = {text.get_position(): text for text in axes.texts}
    assert texts[(1, 0)].get_text() == "3" and texts[(1, 0)].get_color() == "black"
    assert texts[(9, 9)].get_text() == "163" and texts[(9, 9)].get_color() == "white"
    # Names that do not fit the matrix are not used: the class numbers are.
    plots.plot_confusion(final, tmp_path / "d.png", class_names=("a", "b"))
    assert labels(drawn["d.png"].axes[0].get_xticklabels()) == [str(i) for i in range(10)]


def test_a_run_folder_labels_confusion_matrices_with_its_datasets_class_names(
    tmp_path: Path, drawn: dict[str, Any]
) -> None:
    write_jsonl(
        tmp_path / "rounds.jsonl",
        [{"mixing": "fixed", "round": 1, "node": 0, "test_accuracy": 0.5}],
    )
    write_jsonl(tmp_path / "final.jsonl", [final_record(10)])
    write_jsonl(tmp_path / "trust.jsonl", [trust_snapshot(3, mixing="fixed")])
    config = {"data": {"dataset": "mnist", "split": "iid"}}
    (tmp_path / "summary.json").write_text(
        json.dumps({"by_mixing": {"fixed": {}}, "configs": [config]})
    )
    made = plots.plot_run_folder(tmp_path)
    assert sorted(p.name for p in made) == [
        "accuracy.png",
        "confusion_fixed.png",
        "trust_fixed.png",
    ]
    axes = drawn["confusion_fixed.png"].axes[0]
    assert labels(axes.get_xticklabels()) == list(CLASSES["mnist"])


def test_error_bars_of_a_percentage_stay_between_0_and_100(
    tmp_path: Path, drawn: dict[str, Any]
) -> None:
    series = {"learned": [[6, 99.0, 3.0], [12, 1.0, 4.0]]}
    plots.plot_lines(
        series, tmp_path / "l.png", xlabel="nodes", ylabel="%", title="t", limits=(0.0, 100.0)
    )
    axes = drawn["l.png"].axes[0]
    ends = np.concatenate([s[:, 1] for c in axes.collections for s in c.get_segments()])
    assert ends.min() == 0.0 and ends.max() == 100.0
    bottom, top = axes.get_ylim()
    assert bottom >= 0.0 and top <= 100.0
