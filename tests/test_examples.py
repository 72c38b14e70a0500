"""The examples in ``examples/`` run as their docstrings say, at small sizes.

Each example is run through the real ``fedtorrent simulate --task`` (in-process) for a few rounds
and its summary checked for sensible metrics; the tabular one also through a real
``create --task`` + ``swarm --task`` with 3 peer processes. The CNN example reads
``FEDTORRENT_EXAMPLE_QUICK=1`` to use a small slice of Fashion-MNIST.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_dataset
from fedtorrent.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
_CLI = "from fedtorrent.cli import main; main()"


def simulate(
    monkeypatch: pytest.MonkeyPatch, out: Path, example: str, *args: str
) -> dict[str, dict[str, float]]:
    """Run ``fedtorrent simulate --task examples/EXAMPLE:task ARGS``; the learned rule's metrics."""
    argv = ["fedtorrent", "simulate", "--task", f"{EXAMPLES / example}:task", "--mixing",
            "learned", "--no-progress", "--no-plots", "--out", str(out), *args]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), f"simulate exited with {exc.code}"
    summary = json.loads((out / "summary.json").read_text())
    metrics: dict[str, dict[str, float]] = summary["by_mixing"]["learned"]["metrics"]
    return metrics


def test_every_example_has_a_task_and_a_readme_line() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    files = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert files == ["cnn_batchnorm.py", "custom_step.py", "regression.py", "tabular.py"]
    for name in files:
        assert f"`{name}`" in readme
        text = (EXAMPLES / name).read_text()
        assert f"simulate --task examples/{name}:task" in text
        assert "swarm runs/" in text and f"--task examples/{name}:task --peers" in text


def test_tabular_example_classifies_breast_cancer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    metrics = simulate(monkeypatch, tmp_path, "tabular.py", "--nodes", "3", "--rounds", "5")
    assert metrics["accuracy"]["mean"] >= 0.9
    assert set(metrics) == {"loss", "accuracy", "precision", "recall", "f1"}


def test_regression_example_reports_r2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    metrics = simulate(monkeypatch, tmp_path, "regression.py", "--nodes", "3", "--rounds", "10")
    assert set(metrics) == {"loss", "r2"}
    assert 0.3 <= metrics["r2"]["mean"] <= 1  # a linear model on diabetes reaches about 0.45


def test_custom_step_example_learns_digits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    metrics = simulate(monkeypatch, tmp_path, "custom_step.py", "--nodes", "3", "--rounds", "5")
    assert metrics["accuracy"]["mean"] >= 0.8


def test_cnn_batchnorm_example_learns_on_a_small_slice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    require_dataset("fashion-mnist")
    monkeypatch.setenv("FEDTORRENT_EXAMPLE_QUICK", "1")
    metrics = simulate(monkeypatch, tmp_path, "cnn_batchnorm.py", "--nodes", "2", "--rounds", "2")
    assert metrics["accuracy"]["mean"] >= 0.3  # 10 classes: chance is 0.1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["by_mixing"]["learned"]["engine_path"] == "loop"  # BatchNorm has buffers


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``fedtorrent ARGS`` in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", _CLI, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.network
@pytest.mark.slow
def test_tabular_example_runs_in_a_three_peer_swarm(tmp_path: Path) -> None:
    torrent = tmp_path / "session.torrent"
    spec = "examples/tabular.py:task"  # relative to the repository, as in the docstring
    made = cli("create", "--task", spec, "--nodes", "3", "--cohort", "2", "--rounds", "5",
               "-o", str(torrent), cwd=ROOT)  # fmt: skip
    assert made.returncode == 0, made.stderr
    run = tmp_path / "run"
    done = cli("swarm", str(torrent), "--task", spec, "--peers", "3", "--out", str(run),
               "--no-live", "--no-plots", "--exchange-timeout", "20", cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((run / "summary.json").read_text())["test_metrics"]
    assert metrics["accuracy"]["peers"] == 3
    assert metrics["accuracy"]["mean"] >= 0.85  # the majority class alone gives 0.63
    assert "test accuracy" in done.stdout
