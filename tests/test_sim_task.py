"""The simulator runs any Task: tabular, regression, buffers, custom steps; both engine paths."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from torch import nn
from torch.nn import functional as F

import fedtorrent as ft
from fedtorrent.cli import main
from fedtorrent.config import DataConfig, MixingConfig, SimConfig, TrainConfig
from fedtorrent.sim.engine import Engine
from fedtorrent.sim.loop import ModuleLoopBackend, StateLayout
from fedtorrent.sim.tasks import run_task, stack_nodes
from fedtorrent.sim.topology import Topology
from fedtorrent.state.codec import decode_state


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _standardize(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean(0)) / (x.std(0) + 1e-8)).astype(np.float32)


def _splitter(x: np.ndarray, y: np.ndarray, *, test: int, uneven: bool = False):
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]

    def data(node: int, num_nodes: int) -> ft.NodeData:
        rows = np.arange(test, len(y))
        if uneven:  # node i gets a share proportional to i + 1
            cuts = (
                np.cumsum(np.arange(1, num_nodes + 1))[:-1]
                * len(rows)
                // (num_nodes * (num_nodes + 1) // 2)
            )
            idx = np.split(rows, cuts)[node]
        else:
            idx = np.array_split(rows, num_nodes)[node]
        cut = int(len(idx) * 0.8)
        return ft.NodeData(
            train=(x[idx[:cut]], y[idx[:cut]]),
            val=(x[idx[cut:]], y[idx[cut:]]),
            test=(x[:test], y[:test]),
        )

    return data


_CANCER_X, _CANCER_Y = load_breast_cancer(return_X_y=True)
CANCER = _splitter(_standardize(_CANCER_X), _CANCER_Y.astype(np.int64), test=120)
_DIAB_X, _DIAB_Y = load_diabetes(return_X_y=True)
DIABETES = _splitter(
    _standardize(_DIAB_X), _standardize(_DIAB_Y.reshape(-1, 1)), test=100
)  # targets (N, 1) float32
_DIGITS_X, _DIGITS_Y = load_digits(return_X_y=True)
DIGITS = _splitter((_DIGITS_X / 16).astype(np.float32), _DIGITS_Y.astype(np.int64), test=400)
DIGIT_IMAGES = _splitter(
    (_DIGITS_X / 16).astype(np.float32).reshape(-1, 1, 8, 8), _DIGITS_Y.astype(np.int64), test=200
)


def r2(output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    residual = ((output - target) ** 2).sum()
    total = ((target - target.mean()) ** 2).sum()
    return {"r2": float(1 - residual / total)}


def mlp(inputs: int, outputs: int, *extra: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, 32), *extra, nn.ReLU(), nn.Linear(32, outputs))


def config(
    nodes: int = 3,
    rounds: int = 2,
    *,
    rule: str = "fixed",
    train: TrainConfig | None = None,
) -> SimConfig:
    return SimConfig(
        data=DataConfig(num_nodes=nodes),
        rounds=rounds,
        round_schedule="constant",
        train=train or TrainConfig(lr=0.1, batch_size=32),
        mixing=MixingConfig(rule=rule),
    )


def test_tabular_classification_runs_vectorized_with_default_metrics() -> None:
    task = ft.Task(model=lambda: mlp(30, 2), data=CANCER)
    outcomes, summary = ft.simulate(config(rule="learned"), task=task)
    row = summary["by_mixing"]["learned"]
    assert row["engine_path"] == "vectorized"
    assert set(row["metrics"]) == {"loss", "accuracy", "precision", "recall", "f1"}
    assert row["metrics"]["accuracy"]["mean"] > 0.9
    assert len(outcomes[0].final) == 3


def test_regression_with_mse_reports_r2_mean_and_std(tmp_path: Path) -> None:
    task = ft.Task(model=lambda: nn.Linear(10, 1), data=DIABETES, loss=F.mse_loss, metrics=r2)
    train = TrainConfig(lr=0.05, batch_size=16, epochs=2)
    outcomes, summary = ft.simulate(
        config(rounds=3, train=train), task=task, out_dir=tmp_path, save_models=True
    )
    metrics = summary["by_mixing"]["fixed"]["metrics"]
    assert set(metrics) == {"loss", "r2"}
    assert metrics["r2"]["mean"] > 0.3 and metrics["r2"]["std"] >= 0
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["by_mixing"]["fixed"]["metrics"]["r2"] == pytest.approx(metrics["r2"])
    paths = outcomes[0].model_paths
    assert [p.name for p in paths] == [
        "node-0.safetensors",
        "node-1.safetensors",
        "node-2.safetensors",
    ]
    state = decode_state(paths[0].read_bytes())
    assert set(state) == {"weight", "bias"} and outcomes[0].states is None


def test_batchnorm1d_statistics_move_and_counters_stay_exact_integers() -> None:
    task = ft.Task(model=lambda: mlp(30, 2, nn.BatchNorm1d(32)), data=CANCER)
    outcomes, summary = ft.simulate(config(rule="learned"), task=task, keep_states=True)
    assert summary["by_mixing"]["learned"]["engine_path"] == "loop"
    states = outcomes[0].states
    assert states is not None
    initial = task.make_model(seed=0).state_dict()
    for state in states:
        assert not torch.equal(state["1.running_mean"], initial["1.running_mean"])
        assert state["1.num_batches_tracked"].dtype == torch.int64
        # Every node runs the same number of steps: averaged counters agree exactly.
        assert int(state["1.num_batches_tracked"]) == int(states[0]["1.num_batches_tracked"]) > 0
    # Mixed with the same weights: fixed mixing leaves every node with one running mean.
    fixed, _ = ft.simulate(config(), task=task, keep_states=True)
    assert fixed[0].states is not None
    torch.testing.assert_close(
        fixed[0].states[0]["1.running_mean"], fixed[0].states[2]["1.running_mean"]
    )


def test_local_buffers_stay_per_node() -> None:
    task = ft.Task(model=lambda: mlp(30, 2, nn.BatchNorm1d(32)), data=CANCER, buffers="local")
    outcomes, _ = ft.simulate(config(), task=task, keep_states=True)
    states = outcomes[0].states
    assert states is not None
    assert not torch.allclose(states[0]["1.running_mean"], states[1]["1.running_mean"])
    torch.testing.assert_close(states[0]["0.weight"], states[1]["0.weight"])  # params do mix


def test_a_batchnorm_mlp_in_the_simulator_learns_like_the_same_model_alone() -> None:
    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))

    task = ft.Task(model=model, data=DIGITS)
    train = TrainConfig(lr=0.05, batch_size=32, momentum=0.9)
    _, summary = ft.simulate(config(nodes=4, rounds=4, train=train), task=task)
    together = summary["by_mixing"]["fixed"]["metrics"]["accuracy"]["mean"]
    _, alone = ft.simulate(config(nodes=1, rounds=4, train=train), task=task)
    single = alone["by_mixing"]["fixed"]["metrics"]["accuracy"]["mean"]
    assert single > 0.9
    assert together > single - 0.04, (together, single)


@pytest.mark.parametrize(
    "layer",
    [
        pytest.param(lambda: nn.BatchNorm2d(4), id="batchnorm2d"),
        pytest.param(lambda: nn.GroupNorm(2, 4), id="groupnorm"),
        pytest.param(lambda: nn.Dropout(0.2), id="dropout"),
    ],
)
def test_convolutional_models_with_norm_and_dropout_layers_run(layer) -> None:
    def model() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), layer(), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)
        )

    task = ft.Task(model=model, data=DIGIT_IMAGES)
    outcomes, summary = ft.simulate(config(rule="learned"), task=task, keep_states=True)
    assert summary["by_mixing"]["learned"]["metrics"]["accuracy"]["mean"] > 0.2  # chance: 0.1
    states = outcomes[0].states
    assert states is not None
    if "1.running_mean" in states[0]:
        assert float(states[0]["1.running_mean"].abs().sum()) > 0
        assert int(states[0]["1.num_batches_tracked"]) > 0


def test_a_custom_train_step_with_gradient_clipping_runs_on_the_loop() -> None:
    calls = []

    def clipped(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], ctx) -> torch.Tensor:
        x, y = batch
        ctx.optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        calls.append(float(nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        ctx.optimizer.step()
        return loss.detach()

    task = ft.Task(model=lambda: mlp(30, 2), data=CANCER, train_step=clipped)
    _, summary = ft.simulate(config(), task=task)
    assert summary["by_mixing"]["fixed"]["engine_path"] == "loop"
    assert summary["by_mixing"]["fixed"]["metrics"]["accuracy"]["mean"] > 0.85
    assert len(calls) > 3 * 2 * 2  # nodes x rounds x batches, beyond the check's one step


def test_vectorized_path_and_per_node_loop_give_the_same_result() -> None:
    task = ft.Task(model=lambda: mlp(30, 2), data=_splitter(
        _standardize(_CANCER_X), _CANCER_Y.astype(np.int64), test=120, uneven=True
    ))  # fmt: skip
    train = TrainConfig(lr=0.05, batch_size=24, momentum=0.9, lr_schedule="cosine")
    run = dataclasses.replace(config(nodes=3, rule="learned", train=train), round_schedule="cosine")
    fast = run_task(run, task, path="vectorized", keep_states=True)
    slow = run_task(run, task, path="loop", keep_states=True)
    assert (fast.engine_path, slow.engine_path) == ("vectorized", "loop")
    assert fast.states is not None and slow.states is not None
    for a, b in zip(fast.states, slow.states, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)
    for a, b in zip(fast.final, slow.final, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    assert fast.weights is not None and slow.weights is not None
    np.testing.assert_allclose(fast.weights, slow.weights, atol=1e-4)


def test_privacy_hooks_see_parameters_only_and_counters_mix_exactly() -> None:
    task = ft.Task(model=lambda: mlp(30, 2, nn.BatchNorm1d(32)), data=CANCER)
    run = config()
    model = task.make_model(seed=0)
    layout = StateLayout(model)
    seen = []

    def share(params, round_index, *, before, public):
        seen.append(params.shape[1])
        return params + 1e3  # an obvious change to what the others receive

    engine = Engine(
        backend=ModuleLoopBackend(
            model,
            layout=layout,
            num_nodes=3,
            make_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        ),
        data=stack_nodes([task.node_data(i, 3) for i in range(3)]),
        train=run.train,
        mixing=run.mixing,
        topology=Topology(run.topology, num_nodes=3, seed=0),
        init=layout.flatten(model.state_dict()),
        seed=0,
        share=share,
    )
    engine.run_round(0)
    assert seen == [layout.num_params] and layout.num_params < layout.width
    buffers = engine.params[:, layout.num_params :]
    assert float(buffers.abs().max()) < 100  # the shift reached parameters only
    # Counters beyond float32's exact range stay exact.
    backend = engine.backend
    assert isinstance(backend, ModuleLoopBackend)
    big = 2**40 + 1
    backend.counters["1.num_batches_tracked"][:] = big
    engine.run_round(1)  # trains (one more batch each), then mixes the counters exactly
    assert len(set(backend.counters["1.num_batches_tracked"].tolist())) == 1
    assert backend.counters["1.num_batches_tracked"][0] > big


def test_a_builtin_task_takes_the_builtin_fast_path() -> None:
    run = dataclasses.replace(config(), data=DataConfig(dataset="digits", num_nodes=3))
    by_task, summary = ft.simulate(run, task=ft.builtin_task("digits", "logreg"))
    by_config, _ = ft.simulate(run)
    assert summary["by_mixing"]["fixed"]["engine_path"] == "linear"
    assert by_task[0].accuracies == by_config[0].accuracies


TASK_FILE = """
import numpy as np
from sklearn.datasets import load_diabetes
from torch import nn
from torch.nn import functional as F
import fedtorrent as ft

x, y = load_diabetes(return_X_y=True)
x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
y = ((y - y.mean()) / y.std()).astype(np.float32).reshape(-1, 1)

def data(node, num_nodes):
    idx = np.array_split(np.arange(100, len(y)), num_nodes)[node]
    return ft.NodeData(train=(x[idx], y[idx]), test=(x[:100], y[:100]))

def r2(output, target):
    return {"r2": float(1 - ((output - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())}

task = ft.Task(model=lambda: nn.Linear(10, 1), data=data, loss=F.mse_loss, metrics=r2)
not_a_task = 3
"""


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str):
    monkeypatch.setattr(sys, "argv", ["fedtorrent", *args])
    monkeypatch.setenv("COLUMNS", "200")
    try:
        main()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_simulate_task_prints_mean_and_std_and_saves_models(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "mytask.py").write_text(TASK_FILE)
    out = tmp_path / "run"
    status, printed, err = _cli(
        monkeypatch, capsys, "simulate", "--task", f"{tmp_path / 'mytask.py'}:task",
        "--nodes", "3", "--rounds", "2", "--lr", "0.05", "--mixing", "fixed", "--no-progress",
        "--save-models",
        "--out", str(out),
    )  # fmt: skip
    assert status == 0, err
    assert "fixed (vectorized, test, 1 run(s)): loss" in printed and "r2 " in printed
    assert "±" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["by_mixing"]["fixed"]["metrics"]) == {"loss", "r2"}
    assert len(list((out / "models" / "fixed-seed0").glob("node-*.safetensors"))) == 3
    assert (out / "final.csv").read_text().splitlines()[0].endswith("loss,r2,train_examples")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.py:task", "does not exist"),
        ("{dir}/mytask.py:nothing", "nothing"),
        ("{dir}/mytask.py:not_a_task", "not a"),
        ("{dir}/mytask.py", ":NAME"),
    ],
)
def test_bad_task_specs_are_one_line_errors_with_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    spec: str,
    message: str,
) -> None:
    (tmp_path / "mytask.py").write_text(TASK_FILE)
    monkeypatch.chdir(tmp_path)
    status, _printed, err = _cli(
        monkeypatch, capsys, "simulate", "--task", spec.format(dir=tmp_path), "--no-progress",
        "--rounds", "1", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()
