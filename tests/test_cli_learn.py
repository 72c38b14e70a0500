from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtorrent.cli import main


def _run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """Run ``fedtorrent ARGS`` in this process; return (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fedtorrent", *args])
    monkeypatch.setenv("COLUMNS", "200")
    threads = torch.get_num_threads()
    try:
        main()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    finally:
        torch.set_num_threads(threads)  # ``train`` sets it for the process
    out, err = capsys.readouterr()
    return status, out, err


def test_train_prints_metrics_and_writes_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    record = tmp_path / "metrics.json"
    status, out, _ = _run(
        monkeypatch, capsys, "train", "--dataset", "digits", "--no-progress",
        "--per-class", "--confusion", "--json", str(record),
    )  # fmt: skip
    assert status == 0
    for text in (
        "accuracy",
        "macro precision",
        "macro recall",
        "macro F1",
        "per class",
        "confusion",
    ):
        assert text in out
    saved = json.loads(record.read_text())
    assert saved["dataset"] == "digits" and saved["model"] == "logreg"
    assert saved["metrics"]["accuracy"] > 0.88
    assert f"{saved['metrics']['accuracy']:.4f}" in out
    assert saved["train"]["optimizer"] == "adam" and saved["train"]["epochs"] == 10
    assert len(saved["metrics"]["confusion"]) == 10


def test_train_options_reach_the_training(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    record = tmp_path / "m.json"
    args = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--lr", "0.05",
            "--optimizer", "sgd", "--schedule", "constant", "--batch-size", "32", "--seed", "4",
            "--no-progress", "--json", str(record)]  # fmt: skip
    assert _run(monkeypatch, capsys, *args)[0] == 0
    train = json.loads(record.read_text())["train"]
    assert (train["epochs"], train["lr"], train["optimizer"], train["batch_size"]) == (
        1,
        0.05,
        "sgd",
        32,
    )
    assert (train["lr_schedule"], train["seed"]) == ("constant", 4)


def test_partition_prints_sizes_and_histograms(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run(
        monkeypatch, capsys, "partition", "--dataset", "digits", "--nodes", "4",
        "--split", "shards", "--classes-per-node", "2", "--seed", "1",
    )  # fmt: skip
    assert status == 0
    rows = [line.split() for line in out.splitlines()]
    nodes = [row for row in rows if row and row[0] in {"0", "1", "2", "3"} and len(row) == 13]
    assert len(nodes) == 4
    for row in nodes:
        train, val, histogram = int(row[1]), int(row[2]), [int(c) for c in row[3:]]
        assert train + val == sum(histogram)
        assert sum(c > 0 for c in histogram) == 2
    assert any(row and row[0] == "all" for row in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--dataset", "svhn"], "unknown dataset 'svhn'; choose one of:"),
        (["train", "--dataset", "digits", "--model", "resnet"], "unknown model 'resnet'"),
        (["train", "--dataset", "mnist", "--data-dir", "/no/such/folder"], "does not exist"),
        (["train", "--dataset", "digits", "--optimizer", "lbfgs"], "optimizer must be one of"),
        (["train", "--dataset", "digits", "--lr", "0"], "lr must be > 0"),
        (["train", "--dataset", "digits", "--json", "/dev/null/m.json"], "cannot write"),
        (["partition", "--dataset", "digits", "--nodes", "5000"], "more nodes than examples"),
        (
            ["partition", "--dataset", "digits", "--split", "noniid", "--alpha", "0"],
            "alpha must be > 0",
        ),
        (["partition", "--dataset", "digits", "--split", "unbalanced", "--alpha", "-1"], "alpha"),
        (
            [
                "partition",
                "--dataset",
                "digits",
                "--nodes",
                "20",
                "--min-per-node",
                "100",
                "--split",
                "unbalanced",
            ],
            "at least 100 examples",
        ),
        (
            ["partition", "--dataset", "digits", "--split", "shards", "--classes-per-node", "11"],
            "exceeds the 10 classes",
        ),
        (["partition", "--split", "powerlaw"], "split must be one of"),
        (["partition", "--dataset", "nope"], "unknown dataset 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_two(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    status, _, err = _run(monkeypatch, capsys, *args)
    assert status == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.network
@pytest.mark.timeout(60)
def test_the_installed_command_reports_errors_in_one_line() -> None:
    command = Path(sys.executable).with_name("fedtorrent")
    result = subprocess.run(
        [str(command), "partition", "--dataset", "digits", "--nodes", "5000"],
        capture_output=True, text=True, timeout=50, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot split 1437 examples across 5000 nodes")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


@pytest.mark.timeout(120)
def test_the_installed_command_exits_at_once_after_torch_with_everything_written(
    tmp_path: Path,
) -> None:
    command = Path(sys.executable).with_name("fedtorrent")
    base = [str(command), "simulate", "--dataset", "digits", "--nodes", "2", "--rounds", "1",
            "--no-plots", "--no-progress"]  # fmt: skip
    result = subprocess.run(
        [*base, "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    last = " ".join(result.stdout.split())  # rich wraps long lines
    assert last.endswith(f"summary.json in {tmp_path / 'run'}")  # all of stdout was flushed
    assert (tmp_path / "run" / "summary.json").is_file()
    failed = subprocess.run(
        [*base, "--threads", "0"], capture_output=True, text=True, timeout=100, check=False
    )
    assert failed.returncode == 2
    assert failed.stderr == "error: threads must be >= 1, got 0\n"
