"""Real peers run a user's Task: ``create --task``, ``peer --task`` and ``swarm --task``.

The swarm tests start real ``fedtorrent`` processes (a tracker and 3 peers over ZeroMQ) on tiny
scikit-learn tasks written to a temporary file, as a user would write them; the checks on bad
input run the real CLI and read its one line on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtorrent.config import MixingConfig
from fedtorrent.errors import TorrentError
from fedtorrent.mixing.round import mix_exact
from fedtorrent.net.torrent import Session, TaskInfo, Torrent, load_torrent
from fedtorrent.state.layout import StateLayout
from fedtorrent.state.schema import state_schema

ROOT = Path(__file__).resolve().parents[1]
_CLI = "from fedtorrent.cli import main; main()"

TASKS = textwrap.dedent(
    """
    import numpy as np
    import torch
    from sklearn.datasets import load_breast_cancer, load_diabetes
    from torch import nn
    from torch.nn import functional as F

    import fedtorrent as ft


    def _split(x, y, node, num_nodes):
        order = np.random.default_rng(0).permutation(len(y))
        test, rest = order[:100], order[100:]
        mine = np.array_split(rest, num_nodes)[node]
        cut = len(mine) // 5
        return ft.NodeData(train=(x[mine[cut:]], y[mine[cut:]]),
                           val=(x[mine[:cut]], y[mine[:cut]]), test=(x[test], y[test]))


    def _standard(x):
        return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


    def cancer_data(node, num_nodes):
        x, y = load_breast_cancer(return_X_y=True)
        return _split(_standard(x), y.astype(np.int64), node, num_nodes)


    def bn_model():
        return nn.Sequential(nn.Linear(30, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


    def wide_model():
        return nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 2))


    def diabetes_data(node, num_nodes):
        x, y = load_diabetes(return_X_y=True)
        y = ((y - y.mean()) / y.std()).astype(np.float32)[:, None]
        return _split(_standard(x), y, node, num_nodes)


    def r2(output, target):
        residual = ((output - target) ** 2).sum()
        total = ((target - target.mean()) ** 2).sum()
        return {"r2": float(1 - residual / total)}


    cancer = ft.Task(model=bn_model, data=cancer_data)
    other_model = ft.Task(model=wide_model, data=cancer_data)
    diabetes = ft.Task(model=lambda: nn.Linear(10, 1), data=diabetes_data, loss=F.mse_loss,
                       metrics=r2, optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    """
)


def cli(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``fedtorrent ARGS`` in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", _CLI, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def tasks(tmp_path: Path) -> Path:
    path = tmp_path / "mytasks.py"
    path.write_text(TASKS)
    return path


def create(folder: Path, spec: str, *, rounds: int = 3, extra: tuple[str, ...] = ()) -> Path:
    out = folder / "session.torrent"
    done = cli("create", "--task", spec, "--nodes", "3", "--rounds", str(rounds), "--cohort",
               "2", "--output", str(out), *extra, cwd=folder)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def swarm(folder: Path, torrent: Path, spec: str) -> dict[str, object]:
    run = folder / "run"
    # The 3 peers are threads of one process (one torch import), each loading the task file:
    # hosted peers must not see each other's half-imported task module.
    done = cli("swarm", str(torrent), "--task", spec, "--peers", "3", "--out", str(run),
               "--no-live", "--no-plots", "--exchange-timeout", "10", "--processes", "1",
               cwd=folder)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary: dict[str, object] = json.loads((run / "summary.json").read_text())
    summary["stdout"] = done.stdout
    return summary


# --- fast: the torrent's task field and exact mixing -------------------------------------------


def _session(task: TaskInfo | None, state_size: int) -> Session:
    from fedtorrent.config import DataConfig, ModelConfig, TrainConfig

    return Session(
        name="t",
        model=ModelConfig("task"),
        data=DataConfig(dataset="task", num_nodes=3),
        train=TrainConfig(),
        mixing=MixingConfig(),
        rounds=1,
        cohort_size=2,
        state_sha256="0" * 64,
        state_size=state_size,
        task=task,
    )


def test_a_task_torrent_carries_the_schema_and_reads_back_to_the_same_hash() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    schema = state_schema(model)
    session = _session(TaskInfo(label="mine:task", schema=schema), state_size=200)
    torrent = Torrent(announce="http://127.0.0.1:1/announce", session=session)
    again = load_torrent(torrent.to_bytes())
    assert again.info_hash == torrent.info_hash
    assert again.session.task is not None
    assert again.session.task.schema == schema
    layout = StateLayout.from_schema(again.session.task.schema)
    assert layout.exact == ("1.num_batches_tracked",)
    assert "1.running_mean" in layout.mix and "1.weight" in layout.parameters


def test_a_torrent_whose_schema_does_not_fit_its_state_or_is_malformed_is_refused() -> None:
    schema = state_schema(torch.nn.Linear(1000, 1000))  # 4 MB of weights
    with pytest.raises(Exception, match="cannot hold"):
        _session(TaskInfo(label="x", schema=schema), state_size=200)
    with pytest.raises(Exception, match="dtype"):
        bad = {**schema, "tensors": {"w": {"shape": [1], "dtype": "pickle", "kind": "parameter",
                                           "share": "mix"}}}  # fmt: skip
        TaskInfo(label="x", schema=bad)
    good = _session(TaskInfo(label="x", schema=state_schema(torch.nn.Linear(2, 1))), 100)
    payload = Torrent(announce="http://127.0.0.1:1/announce", session=good).to_bytes()
    with pytest.raises(TorrentError, match=r"info\.task"):
        load_torrent(payload.replace(b"5:share3:mix", b"5:share3:xyz", 1))


def test_exact_mixing_keeps_integer_counters_exact_beyond_float32() -> None:
    big = 2**24 + 1  # float32 cannot hold it: a float round trip would give 2**24
    values = torch.tensor([big, big, big])
    own = torch.zeros(1, dtype=torch.long)
    weights = torch.tensor([[0.2, 0.3, 0.5]])
    mixed = mix_exact(values, weights=weights, self_column=own)
    assert mixed.dtype == torch.int64 and mixed.tolist() == [big]
    pair = torch.tensor([[0.75, 0.25]])
    uneven = mix_exact(torch.tensor([10, 20]), weights=pair, self_column=own)
    assert uneven.tolist() == [12]  # 12.5 rounds to even, in its own dtype
    counters = torch.tensor([[big], [big + 4]])  # two receivers, each its own column
    both = mix_exact(counters, weights=torch.full((2, 2), 0.5), self_column=torch.arange(2))
    assert both.tolist() == [[big + 2], [big + 2]]


# --- real processes ----------------------------------------------------------------------------


@pytest.mark.network
@pytest.mark.slow
def test_a_three_peer_swarm_trains_a_tabular_batchnorm_task_from_a_task_file(
    tmp_path: Path, tasks: Path
) -> None:
    spec = f"{tasks.name}:cancer"  # relative: swarm hands every peer the absolute path
    torrent = create(tmp_path, spec, rounds=3)
    assert load_torrent(torrent).session.task is not None
    summary = swarm(tmp_path, torrent, spec)
    metrics = summary["test_metrics"]
    assert isinstance(metrics, dict)
    assert metrics["accuracy"]["peers"] == 3 and metrics["accuracy"]["mean"] > 0.8
    assert set(metrics) == {"accuracy", "f1", "loss", "precision", "recall"}
    assert "test accuracy" in str(summary["stdout"])
    for index in range(3):
        state = load_file(tmp_path / f"run/peers/peer-{index:02d}/checkpoint.safetensors")
        counter = state["1.num_batches_tracked"]
        # 2 batches a round over 3 rounds; mixing with a peer a round ahead may add some, but
        # the counter stays an int64 integer, never a float32 round trip.
        assert counter.dtype == torch.int64 and 6 <= int(counter) <= 9


@pytest.mark.network
@pytest.mark.slow
def test_a_swarm_learns_a_regression_task_with_mse_and_reports_r2(
    tmp_path: Path, tasks: Path
) -> None:
    torrent = create(tmp_path, f"{tasks}:diabetes", rounds=4, extra=("--epochs", "3"))
    summary = swarm(tmp_path, torrent, f"{tasks}:diabetes")
    metrics = summary["test_metrics"]
    assert isinstance(metrics, dict) and set(metrics) == {"loss", "r2"}
    assert metrics["r2"]["peers"] == 3 and metrics["r2"]["mean"] > 0.2
    assert "test r2" in str(summary["stdout"])
    record = json.loads((tmp_path / "run/peers/peer-00/metrics.jsonl").read_text().splitlines()[-1])
    assert "test_r2" in record and "val_loss" in record and "test_accuracy" not in record


@pytest.mark.network
def test_a_peer_whose_model_differs_from_the_torrent_gets_one_line_naming_the_key(
    tmp_path: Path, tasks: Path
) -> None:
    torrent = create(tmp_path, f"{tasks}:cancer", rounds=1)
    done = cli("peer", str(torrent), "--task", f"{tasks}:other_model", "--out",
               str(tmp_path / "p"), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not match the state schema" in lines[0] and "key '" in lines[0]


@pytest.mark.network
def test_task_and_torrent_must_agree_and_a_broken_task_is_one_line(
    tmp_path: Path, tasks: Path
) -> None:
    torrent = create(tmp_path, f"{tasks}:cancer", rounds=1)
    missing = cli("peer", str(torrent), "--out", str(tmp_path / "p"), cwd=tmp_path)
    assert missing.returncode == 2 and "made with --task" in missing.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("import fedtorrent\ndef broken(:\n")
    for spec, words in ((f"{broken}:task", "SyntaxError"), ("nosuchmodule:task", "no module")):
        done = cli("peer", str(torrent), "--task", spec, "--out", str(tmp_path / "p"),
                   cwd=tmp_path)  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and words in lines[0], done.stderr
    made = cli("create", "--task", f"{broken}:task", "--output", str(tmp_path / "b.torrent"),
               cwd=tmp_path)  # fmt: skip
    assert made.returncode == 2 and len(made.stderr.strip().splitlines()) == 1
    builtin = tmp_path / "digits.torrent"
    assert (
        cli("create", "--dataset", "digits", "--output", str(builtin), cwd=tmp_path).returncode == 0
    )
    wrong = cli("peer", str(builtin), "--task", f"{tasks}:cancer", "--node-index", "0",
                "--num-nodes", "2", "--out", str(tmp_path / "q"), cwd=tmp_path)  # fmt: skip
    assert wrong.returncode == 2 and "start the peer without --task" in wrong.stderr
