"""The explanatory paper builds from the committed results, and refuses to build without them."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("paper_build", REPO / "paper" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = _build_module()


def _results_copy(tmp_path: Path, *, without: str | None = None) -> Path:
    """A root holding every results file and figure the paper reads, less ``without``."""
    for name in (*build.RESULT_FILES, *build.FIGURES.values()):
        if name != without:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / name, tmp_path / name)
    return tmp_path


def test_paper_builds_into_a_pdf(tmp_path: Path) -> None:
    pytest.importorskip("typst")
    pdf = build.build(root=REPO, output=tmp_path / "fedtorrent.pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    assert len(data) > 200_000  # text, ten tables and the figures, not an empty page
    assert data.count(b"/Type /Page") + data.count(b"/Type/Page") >= 8


def test_a_missing_results_file_is_named(tmp_path: Path) -> None:
    root = _results_copy(tmp_path, without="results/attacks.json")
    with pytest.raises(
        build.MissingResultError, match=r"missing results file results/attacks\.json"
    ):
        build.collect(root)
    assert build.main(["--root", str(root), str(tmp_path / "x.pdf")]) == 2
    assert not (tmp_path / "x.pdf").exists()


def test_a_missing_key_and_a_missing_figure_are_named(tmp_path: Path) -> None:
    root = _results_copy(tmp_path, without=build.FIGURES["nodes"])
    with pytest.raises(build.MissingResultError, match=r"missing figure results/plots/nodes\.png"):
        build.collect(root)
    shutil.copyfile(REPO / build.FIGURES["nodes"], root / build.FIGURES["nodes"])
    path = root / "results/churn.json"
    data = json.loads(path.read_text())
    del data["accuracy_gap_points"]
    path.write_text(json.dumps(data))
    with pytest.raises(
        build.MissingResultError, match=r"results/churn\.json has no key accuracy_gap"
    ):
        build.collect(root)
