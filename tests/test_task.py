"""The task contract: Task and NodeData validation, load_task, check_task, builtin tasks, schema."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import fedtorrent as ft
from fedtorrent.config import DataConfig
from fedtorrent.data import load_dataset, split_nodes
from fedtorrent.errors import ConfigError, DataError, StateError, UnknownNameError
from fedtorrent.models import build_model
from fedtorrent.state.schema import check_schema, schema_mismatch, state_schema, validate_schema
from fedtorrent.task import (
    BuiltinData,
    TrainContext,
    check_task,
    cross_entropy_metrics,
    default_train_step,
)


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# --- small tasks -----------------------------------------------------------------------------


def tabular(count: int = 40, features: int = 5, classes: int = 3, seed: int = 0) -> ft.NodeData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, features)).astype(np.float32)
    y = rng.integers(0, classes, size=count)
    return ft.NodeData(train=(x, y), val=(x[:10], y[:10]), test=(x[:10], y[:10]))


def mlp(features: int = 5, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def tabular_task(**kwargs: Any) -> ft.Task:
    return ft.Task(model=mlp, data=lambda node, num_nodes: tabular(), **kwargs)


class Squares(Dataset[tuple[torch.Tensor, int]]):
    """A map-style dataset the user wrote: (features, label) pairs computed on demand."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        x = torch.full((5,), float(index) / self.count)
        return x, index % 3


class Stream(IterableDataset[tuple[torch.Tensor, int]]):
    def __iter__(self):  # type: ignore[no-untyped-def]
        yield torch.zeros(5), 0


# --- Task --------------------------------------------------------------------------------------


def test_task_defaults_are_cross_entropy_with_classification_metrics() -> None:
    task = tabular_task()
    assert task.uses_cross_entropy and task.loss_fn is functional.cross_entropy
    assert task.metrics_fn is cross_entropy_metrics
    assert task.step_fn is default_train_step
    assert task.buffers == "average"
    output = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    scores = task.metrics_fn(output, torch.tensor([0, 1, 2, 2]))
    assert scores["accuracy"] == pytest.approx(0.75)
    assert set(scores) == {"accuracy", "precision", "recall", "f1"}


def test_a_task_with_another_loss_reports_no_default_metrics() -> None:
    task = tabular_task(loss=functional.mse_loss)
    assert not task.uses_cross_entropy
    assert task.metrics_fn(torch.zeros(2, 1), torch.zeros(2, 1)) == {}
    assert tabular_task(loss=nn.CrossEntropyLoss()).uses_cross_entropy


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"model": mlp()}, "not a built module"),
        ({"model": 3}, "Task.model must be a function ()"),
        ({"model": lambda width: mlp()}, "cannot be called as ()"),
        ({"data": tabular()}, "not a NodeData"),
        ({"data": lambda node: tabular()}, "cannot be called as (node, num_nodes)"),
        ({"loss": "mse"}, "Task.loss must be a function (output, target), got str"),
        ({"metrics": 1.0}, "Task.metrics must be a function"),
        ({"optimizer": torch.optim.SGD(mlp().parameters(), lr=0.1)}, "not a built optimizer"),
        ({"train_step": lambda model, batch: None}, "cannot be called as (model, batch, ctx)"),
        ({"buffers": "fedbn"}, "Task.buffers must be one of average, local; got 'fedbn'"),
    ],
)
def test_task_refuses_parts_that_break_the_contract(kwargs: dict[str, Any], expected: str) -> None:
    arguments: dict[str, Any] = {"model": mlp, "data": lambda node, num_nodes: tabular()}
    arguments.update(kwargs)
    with pytest.raises(ConfigError) as exc:
        ft.Task(**arguments)
    assert expected in one_line(exc)


def test_task_accepts_classes_and_optimizer_classes_as_factories() -> None:
    task = ft.Task(model=bn_mlp, data=lambda n, k: tabular(), optimizer=torch.optim.Adam)
    optimizer = task.make_optimizer(task.make_model().parameters(), ft.TrainConfig())
    assert isinstance(optimizer, torch.optim.Adam)
    assert isinstance(task.make_optimizer(mlp().parameters(), ft.TrainConfig()), torch.optim.Adam)
    default = tabular_task().make_optimizer(mlp().parameters(), ft.TrainConfig(lr=0.3))
    assert isinstance(default, torch.optim.SGD) and default.param_groups[0]["lr"] == 0.3


def test_make_model_with_a_seed_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    task = tabular_task()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first, second = task.make_model(seed=7), task.make_model(seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(task.make_model(seed=8)[0].weight, first[0].weight)


def test_user_errors_become_one_line_and_keep_the_cause(caplog: pytest.LogCaptureFixture) -> None:
    def broken_model() -> nn.Module:
        raise RuntimeError("out of\nmemory")

    def broken_data(node: int, num_nodes: int) -> ft.NodeData:
        raise KeyError("fold")

    task = ft.Task(model=broken_model, data=broken_data)
    with caplog.at_level(logging.INFO, logger="fedtorrent.task"), pytest.raises(ConfigError) as exc:
        task.make_model()
    assert "Task.model" in one_line(exc) and "RuntimeError: out of" in str(exc.value)
    assert isinstance(exc.value.__cause__, RuntimeError)
    assert any(r.exc_info and r.exc_info[1] is exc.value.__cause__ for r in caplog.records)
    with pytest.raises(DataError) as exc:
        task.node_data(1, 3)
    assert "Task.data" in one_line(exc) and "(1, 3) failed: KeyError" in str(exc.value)
    assert isinstance(exc.value.__cause__, KeyError)
    with pytest.raises(ConfigError, match=r"node must be in \[0, 3\), got 3"):
        task.node_data(3, 3)
    wrong = ft.Task(model=lambda: "a model", data=lambda n, k: {"x": 1})
    with pytest.raises(ConfigError, match=re.escape("returned str, not a torch.nn.Module")):
        wrong.make_model()
    with pytest.raises(DataError, match=re.escape("returned dict, not fedtorrent.NodeData")):
        wrong.node_data(0, 1)


# --- NodeData ----------------------------------------------------------------------------------


def test_node_data_takes_numpy_arrays_without_a_copy_and_keeps_dtypes() -> None:
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    y = np.array([0.5, 1.5, 2.5, 3.5])
    data = ft.NodeData(train=(x, y))
    tx, ty = data.tensors("train")
    assert tx.dtype == torch.float64 and ty.dtype == torch.float64
    assert np.shares_memory(tx.numpy(), x)
    assert data.val is None and data.size("val") == 0 and data.size("train") == 4
    bx, by = data.take("train", [3, 1])
    assert torch.equal(bx, torch.tensor([[9.0, 10.0, 11.0], [3.0, 4.0, 5.0]], dtype=torch.float64))
    assert by.tolist() == [3.5, 1.5]


def test_node_data_takes_read_only_arrays_and_tensors_of_any_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((6, 2, 3, 4), dtype=np.float32))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    tokens = torch.randint(0, 50, (6, 7))
    data = ft.NodeData(train=(x, tokens), test=(torch.zeros(2, 2, 3, 4), torch.zeros(2, 7).long()))
    assert data.tensors("train")[0].shape == (6, 2, 3, 4)
    assert data.tensors("test")[1].dtype == torch.int64


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"train": None}, "NodeData.train is required"),
        ({"train": np.zeros((3, 2))}, "must be (x, y) or a map-style torch Dataset"),
        ({"train": (np.zeros((3, 2)), np.zeros(3), np.zeros(3))}, "got tuple of length 3"),
        ({"train": (np.zeros((3, 2)), np.zeros(4))}, "x has 3 examples but y has 4"),
        ({"train": (np.zeros((0, 2)), np.zeros(0))}, "NodeData.train holds no examples"),
        ({"train": (np.zeros((3, 2)), [0, 1, 2])}, "y must be a torch tensor or numpy array"),
        ({"train": (np.array([["a"], ["b"]]), np.zeros(2))}, "numpy dtype <U1; give numbers"),
        ({"train": (np.array([[1.0], [np.nan]]), np.zeros(2))}, "x holds NaN or infinite"),
        ({"train": (np.zeros((2, 1)), np.array([np.inf, 0]))}, "y holds NaN or infinite"),
        ({"train": (np.float32(1.0), np.zeros(1))}, "need a first (example) dimension"),
        ({"train": Stream()}, "is an IterableDataset"),
        ({"train": TensorDataset(torch.zeros(0, 2), torch.zeros(0))}, "is an empty Dataset"),
    ],
)
def test_node_data_refuses_bad_splits(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(DataError) as exc:
        ft.NodeData(**kwargs)
    assert expected in one_line(exc)


def test_node_data_refuses_val_and_test_shaped_unlike_train() -> None:
    x, y = np.zeros((4, 3), dtype=np.float32), np.zeros(4, dtype=np.int64)
    with pytest.raises(DataError) as exc:
        ft.NodeData(train=(x, y), val=(np.zeros((2, 4), dtype=np.float32), y[:2]))
    assert "NodeData.val examples are x (4,) float32" in one_line(exc)
    with pytest.raises(DataError, match=r"NodeData.test .* y \(\) float64, but train"):
        ft.NodeData(train=(x, y), test=(x, np.zeros(4)))


def test_node_data_reads_a_map_style_dataset_item_by_item() -> None:
    val = TensorDataset(torch.zeros(4, 5), torch.zeros(4, dtype=torch.int64))
    data = ft.NodeData(train=Squares(30), val=val)
    assert data.size("train") == 30 and data.size("val") == 4
    x, y = data.take("train", [0, 29])
    assert x.shape == (2, 5) and y.tolist() == [0, 2]
    assert data.tensors("train")[0].shape == (30, 5)
    assert data.take("train", [])[0].shape == (0, 5)
    with pytest.raises(
        DataError, match=r"NodeData.val examples are x \(5,\) float32, y \(\) float32"
    ):
        ft.NodeData(train=Squares(30), val=TensorDataset(torch.zeros(4, 5), torch.zeros(4)))


def test_node_data_checks_dataset_items_when_it_reads_them() -> None:
    class Broken(Squares):
        def __getitem__(self, index: int) -> Any:
            if index == 3:
                return torch.full((5,), float("nan")), 0
            if index == 4:
                return {"x": 1}
            if index == 5:
                raise OSError("image missing")
            return super().__getitem__(index)

    data = ft.NodeData(train=Broken(10))
    with pytest.raises(DataError) as exc:
        data.take("train", [2, 3])
    assert "NodeData.train[3] x holds NaN" in one_line(exc)
    with pytest.raises(DataError, match=r"NodeData.train\[4\] must be an \(x, y\) pair, got dict"):
        data.take("train", [4])
    with pytest.raises(DataError, match=r"NodeData.train\[5\] failed: OSError: image missing"):
        data.take("train", [5])
    with pytest.raises(ConfigError, match="no test split"):
        data.take("test", [0])


# --- load_task ---------------------------------------------------------------------------------

TASK_FILE = """
import numpy as np
from torch import nn
import fedtorrent as ft
from helper import FEATURES  # a file beside this one

def make_model():
    return nn.Linear(FEATURES, 2)

def load(node, num_nodes):
    x = np.ones((8, FEATURES), dtype=np.float32)
    return ft.NodeData(train=(x, np.arange(8) % 2))

task = ft.Task(model=make_model, data=load)

def make_task():
    return ft.Task(model=make_model, data=load, buffers="local")

class Holder:
    small = task

not_a_task = 42

def returns_int():
    return 1
"""


@pytest.fixture(autouse=True)
def _restore_import_state(monkeypatch: pytest.MonkeyPatch) -> Any:
    """load_task puts folders on sys.path and imports modules; undo both after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name == "helper" or name.startswith(("usertasks_pkg", "_fedtorrent_task_")):
            del sys.modules[name]


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    (tmp_path / "helper.py").write_text("FEATURES = 3\n")
    path = tmp_path / "mytask.py"
    path.write_text(TASK_FILE)
    return path


def test_load_task_from_a_file_by_name_factory_and_dotted_name(task_file: Path) -> None:
    task = ft.load_task(f"{task_file}:task")
    assert isinstance(task, ft.Task) and task.buffers == "average"
    assert ft.load_task(f"{task_file}:make_task").buffers == "local"
    assert ft.load_task(f"{task_file}:Holder.small") is task  # the module is imported once
    report = check_task(task)
    assert report.input_shape == (3,) and report.num_classes == 2


def test_load_task_from_a_module_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "usertasks_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("FEATURES = 3\n")
    (package / "tabular.py").write_text(TASK_FILE.replace("from helper", "from .helper"))
    monkeypatch.chdir(tmp_path)  # a module spec is looked up from the current folder
    task = ft.load_task("usertasks_pkg.tabular:task")
    assert isinstance(task, ft.Task)
    assert ft.load_task("usertasks_pkg.tabular:make_task").buffers == "local"
    assert sys.modules["usertasks_pkg.tabular"].task is task


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [
        (":nothing", "has no 'nothing' (Tasks defined there: task)"),
        (":not_a_task", "not_a_task is int, not a fedtorrent.Task (nor a function returning one)"),
        (":returns_int", "returns_int() returned int, not a fedtorrent.Task"),
        (":Holder", "Holder is type, not a fedtorrent.Task"),
        (":2bad", "NAME a Python name"),
        ("", "must be PATH.py:NAME or package.module:NAME"),
    ],
)
def test_load_task_names_what_is_wrong(task_file: Path, suffix: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        ft.load_task(f"{task_file}{suffix}")
    assert expected in one_line(exc)


def test_load_task_refuses_missing_files_and_modules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        ft.load_task(f"{tmp_path / 'absent.py'}:task")
    assert "absent.py' does not exist" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        ft.load_task("no_such_package_xyz.tasks:task")
    assert "no module named 'no_such_package_xyz'" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        ft.load_task("not a module:task")
    assert "neither a .py file nor a module name" in one_line(exc)


@pytest.mark.parametrize(
    ("source", "cause", "expected"),
    [
        ("def broken(:\n", SyntaxError, "failed (line 1): SyntaxError: "),
        ("raise RuntimeError('no GPU here')\n", RuntimeError, "failed: RuntimeError: no GPU here"),
        ("import no_such_dep_xyz\n", ModuleNotFoundError, "No module named 'no_such_dep_xyz'"),
        (
            "def f():\n    raise ValueError('bad\\nsplit')\n",
            ValueError,
            "f() failed: ValueError: bad",
        ),
    ],
)
def test_load_task_keeps_the_users_exception_chained_and_logged(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    source: str,
    cause: type[Exception],
    expected: str,
) -> None:
    path = tmp_path / "faulty.py"
    path.write_text(source)
    with caplog.at_level(logging.INFO, logger="fedtorrent.task"), pytest.raises(ConfigError) as exc:
        ft.load_task(f"{path}:f")
    assert expected in one_line(exc) and str(exc.value).startswith(f"--task '{path}:f': ")
    assert isinstance(exc.value.__cause__, cause)  # chained, not `from None`
    assert any(r.exc_info and r.exc_info[1] is exc.value.__cause__ for r in caplog.records)
    if cause is not ValueError:  # nothing half-imported stays behind
        assert not any(getattr(m, "__file__", None) == str(path) for m in sys.modules.values())


# --- check_task --------------------------------------------------------------------------------


def test_check_task_on_tabular_classification_with_an_mlp() -> None:
    report = check_task(tabular_task(), node=2, num_nodes=5)
    assert report.sizes == {"train": 40, "val": 10, "test": 10}
    assert report.input_shape == (5,) and report.input_dtype == "float32"
    assert report.output_shape == (3,) and report.num_classes == 3
    assert report.metrics == ("accuracy", "f1", "precision", "recall")
    assert np.isfinite(report.loss)
    assert set(report.schema["tensors"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def r2(output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    residual = float(((output - target) ** 2).sum())
    total = float(((target - target.mean()) ** 2).sum())
    return {"r2": 1 - residual / total}


def regression(node: int, num_nodes: int) -> ft.NodeData:
    rng = np.random.default_rng(node)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32))[:, None]
    return ft.NodeData(train=(x, y), test=(x[:5], y[:5]))


def test_check_task_on_regression_with_mse_and_float_targets() -> None:
    task = ft.Task(
        model=lambda: nn.Linear(4, 1), data=regression, loss=functional.mse_loss, metrics=r2
    )
    report = check_task(task, node=1, num_nodes=3)
    assert report.num_classes is None and report.metrics == ("r2",)
    assert report.output_shape == (1,) and report.sizes["val"] == 0


def test_check_task_refuses_a_loss_that_broadcasts_mismatched_shapes() -> None:
    def flat_targets(node: int, num_nodes: int) -> ft.NodeData:
        data = regression(node, num_nodes)
        x, y = data.tensors("train")
        return ft.NodeData(train=(x, y[:, 0]))

    task = ft.Task(model=lambda: nn.Linear(4, 1), data=flat_targets, loss=functional.mse_loss)
    with pytest.raises(DataError) as exc:
        check_task(task)
    assert "the loss broadcasts output (8, 1) against targets (8,)" in one_line(exc)


class TokenModel(nn.Module):
    """Sequences of token ids -> class scores: embedding, mean over positions, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(tokens).mean(dim=1))


def test_check_task_on_integer_token_sequences_with_an_embedding() -> None:
    tokens = torch.randint(0, 50, (20, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20) % 4
    task = ft.Task(model=TokenModel, data=lambda n, k: ft.NodeData(train=(tokens, labels)))
    report = check_task(task)
    assert report.input_dtype == "int64" and report.input_shape == (12,)
    assert report.num_classes == 4


def test_check_task_with_batchnorm_marks_the_counter_shared_exactly() -> None:
    report = check_task(ft.Task(model=bn_mlp, data=lambda n, k: tabular()))
    tensors = report.schema["tensors"]
    assert tensors["1.num_batches_tracked"] == {
        "shape": [],
        "dtype": "int64",
        "kind": "buffer",
        "share": "exact",
    }
    assert tensors["1.running_mean"]["share"] == "mix"
    assert tensors["1.weight"] == {
        "shape": [16],
        "dtype": "float32",
        "kind": "parameter",
        "share": "mix",
    }
    local = state_schema(bn_mlp(), buffers="local")["tensors"]
    assert {k: v["share"] for k, v in local.items() if v["kind"] == "buffer"} == {
        "1.running_mean": "local",
        "1.running_var": "local",
        "1.num_batches_tracked": "local",
    }


def test_check_task_on_a_map_style_dataset() -> None:
    task = ft.Task(model=mlp, data=lambda n, k: ft.NodeData(train=Squares(30), test=Squares(6)))
    report = check_task(task)
    assert report.sizes == {"train": 30, "val": 0, "test": 6} and report.num_classes == 3


def labelled(y_train: Any, y_test: Any = None) -> ft.Task:
    x = np.zeros((len(y_train), 5), dtype=np.float32)
    test = None if y_test is None else (x[: len(y_test)], y_test)
    return ft.Task(model=mlp, data=lambda n, k: ft.NodeData(train=(x, y_train), test=test))


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        (labelled(np.array([0, 1, 5, 2])), "train holds label 5, outside the model's 3 classes"),
        (labelled(np.array([0, -1, 2])), "train holds label -1"),
        (labelled(np.array([0, 1, 2]), np.array([0, 3])), "test holds label 3"),
        (labelled(np.array([0.0, 1.0, 2.0])), "cross-entropy needs integer class labels"),
        (labelled(np.zeros((3, 2), dtype=np.int64)), "targets must have shape (3,)"),
        (labelled(np.array([True, False])), "class labels must be integers, got bool"),
        (
            ft.Task(model=lambda: mlp(features=4), data=lambda n, k: tabular()),
            "the model fails on a train batch x (8, 5) float32: RuntimeError: mat1 and mat2",
        ),
        (
            ft.Task(
                model=mlp,
                data=lambda n, k: ft.NodeData(
                    train=(np.zeros((9, 5)), np.zeros(9, dtype=np.int64))
                ),
            ),
            "(x is float64, the model's parameters float32: convert x",
        ),
        (
            ft.Task(model=lambda: nn.Flatten(0), data=lambda n, k: tabular()),
            "its first dimension must stay the batch",
        ),
        (
            ft.Task(model=mlp, data=lambda n, k: tabular(), loss=lambda o, t: o.sum(1)),
            "the loss must be a finite scalar tensor, got a tensor of shape (8,)",
        ),
        (
            ft.Task(model=mlp, data=lambda n, k: tabular(), loss=lambda o, t: o.sum() * np.inf),
            "the loss must be a finite scalar tensor",
        ),
        (
            ft.Task(
                model=mlp,
                data=lambda n, k: tabular(),
                loss=lambda o, t: torch.tensor(float(o.sum())),
            ),
            "the loss does not depend on the model's parameters",
        ),
        (
            ft.Task(model=mlp, data=lambda n, k: (np.zeros(3), np.zeros(3))),
            "returned tuple, not fedtorrent.NodeData",
        ),
        (
            ft.Task(
                model=mlp,
                data=lambda n, k: ft.NodeData(train=(np.full((2, 5), np.nan), np.zeros(2))),
            ),
            "Task.data <lambda>(0, 1): NodeData.train x holds NaN or infinite values",
        ),
    ],
)
def test_check_task_names_data_problems(task: ft.Task, expected: str) -> None:
    with pytest.raises(DataError) as exc:
        check_task(task)
    assert expected in one_line(exc)
    assert str(exc.value).startswith(("node 0 of 1:", "Task.data"))


def test_check_task_names_problems_in_the_tasks_own_functions() -> None:
    def no_loss(model: nn.Module, batch: Any, ctx: TrainContext) -> None:
        return None

    cases: list[tuple[dict[str, Any], str]] = [
        ({"train_step": no_loss}, "must return the batch's loss as a finite scalar tensor"),
        ({"metrics": lambda o, t: [1.0]}, "returned list, not a dict of name: number"),
        ({"metrics": lambda o, t: {"acc": "high"}}, "metric 'acc' is str, not a number"),
        ({"metrics": lambda o, t: {"": 1.0}}, "returned a metric name ''"),
        ({"optimizer": lambda params: "adam"}, "returned str, not a torch.optim.Optimizer"),
        ({"optimizer": lambda params: 1 / 0}, "failed: ZeroDivisionError: division by zero"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(ConfigError) as exc:
            check_task(tabular_task(**kwargs))
        assert expected in one_line(exc), kwargs
    with pytest.raises(ConfigError, match="unknown device 'quantum'"):
        check_task(tabular_task(), device="quantum")


def test_a_custom_train_step_runs_with_its_context() -> None:
    seen: list[TrainContext] = []

    def clipped(model: nn.Module, batch: Any, ctx: TrainContext) -> torch.Tensor:
        seen.append(ctx)
        x, y = batch
        ctx.optimizer.zero_grad()
        loss = functional.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        ctx.optimizer.step()
        return loss.detach()

    check_task(tabular_task(train_step=clipped, optimizer=lambda p: torch.optim.Adam(p, lr=0.01)))
    (ctx,) = seen
    assert ctx.device == torch.device("cpu") and ctx.round == 0
    assert isinstance(ctx.optimizer, torch.optim.Adam) and ctx.loss is functional.cross_entropy


def test_default_train_step_lowers_the_loss() -> None:
    data = tabular(count=64)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ctx = TrainContext(
        torch.device("cpu"), 0, torch.Generator(), functional.cross_entropy, optimizer
    )
    batch = data.tensors("train")
    batch = (batch[0], batch[1].long())
    first = default_train_step(model, batch, ctx)
    for _ in range(50):
        last = default_train_step(model, batch, ctx)
    assert not last.requires_grad and float(last) < float(first)


# --- builtin_task ------------------------------------------------------------------------------


def test_builtin_task_gives_each_node_exactly_todays_split() -> None:
    task = ft.builtin_task("digits", "logreg", split="noniid", alpha=0.3, seed=3)
    dataset = load_dataset("digits", progress=False)
    splits = split_nodes(
        dataset.y_train,
        DataConfig(dataset="digits", num_nodes=4, split="noniid", alpha=0.3, seed=3),
    )
    assert isinstance(task.data, BuiltinData)
    for node, split in enumerate(splits):
        data = task.node_data(node, 4)
        assert np.array_equal(task.data.splits(4)[node].train, split.train)
        x, y = data.tensors("train")
        assert torch.equal(x, torch.from_numpy(dataset.x_train[split.train]))
        assert torch.equal(y, torch.from_numpy(dataset.y_train[split.train]))
        vx, vy = data.tensors("val")
        assert torch.equal(vx, torch.from_numpy(dataset.x_train[split.val]))
        assert torch.equal(vy, torch.from_numpy(dataset.y_train[split.val]))
        tx, ty = data.tensors("test")
        assert np.shares_memory(tx.numpy(), task.data.dataset().x_test)  # one for all nodes
        assert torch.equal(tx, torch.from_numpy(dataset.x_test))
        assert torch.equal(ty, torch.from_numpy(dataset.y_test))
    torch.manual_seed(11)
    expected = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
    built = task.make_model(seed=11)
    for key, value in expected.state_dict().items():
        assert torch.equal(built.state_dict()[key], value)
    report = check_task(task, node=3, num_nodes=4)
    assert report.num_classes == 10 and report.input_shape == (1, 8, 8)


def test_builtin_task_checks_names_and_settings_before_loading_anything() -> None:
    with pytest.raises(UnknownNameError, match="unknown dataset 'imagenet'"):
        ft.builtin_task("imagenet", "logreg")
    with pytest.raises(UnknownNameError, match="unknown model 'resnet'"):
        ft.builtin_task("mnist", "resnet")
    with pytest.raises(ConfigError, match="does not accept"):
        ft.builtin_task("mnist", "logreg", model_kwargs={"hidden": 3})
    with pytest.raises(ConfigError, match="split must be one of"):
        ft.builtin_task("mnist", "cnn", split="random")
    task = ft.builtin_task("digits", "mlp", val_fraction=0.0, model_kwargs={"hidden": [8]})
    assert task.node_data(0, 2).val is None
    assert task.data.splits(2) is task.data.splits(2)  # type: ignore[attr-defined]


# --- the state schema --------------------------------------------------------------------------


def cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
    )


def test_schema_is_json_and_bencode_ready_and_checks_a_matching_model() -> None:
    from fedtorrent.net.torrent import bdecode, bencode

    schema = state_schema(cnn_bn())
    assert json.loads(json.dumps(schema)) == schema
    assert bdecode(bencode(_bytes_keys(schema))) == _bytes_keys(schema)
    assert list(schema["tensors"]) == sorted(cnn_bn().state_dict())
    assert schema["tensors"]["1.num_batches_tracked"]["share"] == "exact"
    check_schema(schema, cnn_bn())
    assert schema_mismatch(json.loads(json.dumps(schema)), cnn_bn()) is None


def test_check_schema_names_the_first_mismatching_key() -> None:
    schema = state_schema(cnn_bn())
    other = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))
    with pytest.raises(StateError) as exc:
        check_schema(schema, other)
    assert "key '3.bias' has shape [3] in the model, [2] in the session" in one_line(exc)
    with pytest.raises(
        StateError, match=re.escape("'1.num_batches_tracked' is in the session's state but not")
    ):
        untracked = nn.BatchNorm2d(4, track_running_stats=False)
        check_schema(
            schema, nn.Sequential(nn.Conv2d(1, 4, 3), untracked, nn.Flatten(), nn.Linear(144, 2))
        )
    with pytest.raises(
        StateError, match=re.escape("'0.bias' has dtype float64 in the model, float32 in")
    ):
        check_schema(schema, cnn_bn().double())
    assert schema_mismatch(state_schema(cnn_bn(), buffers="local"), cnn_bn()) is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.update(version=2), "version 2 is not 1"),
        (lambda s: s.update(version=True), "version True is not 1"),
        (lambda s: s.update(buffers=["average"]), "not a known policy"),
        (lambda s: s.update(extra=1), "has fields"),
        (lambda s: s["tensors"]["0.bias"].update(shape=[-1]), "bad shape"),
        (lambda s: s["tensors"]["0.bias"].update(shape=[True]), "bad shape"),
        (lambda s: s["tensors"]["0.bias"].update(shape=[1] * 17), "bad shape"),
        (lambda s: s["tensors"]["0.bias"].update(dtype="float8"), "unknown dtype"),
        (lambda s: s["tensors"]["0.bias"].update(dtype=["float32"]), "unknown dtype"),
        (lambda s: s["tensors"]["0.bias"].update(share="local"), "always shared"),
        (lambda s: s["tensors"]["0.bias"].pop("kind"), "needs exactly shape, dtype"),
        (lambda s: s["tensors"].update({"": {}}), "key must be a string"),
    ],
)
def test_validate_schema_refuses_malformed_schemas(change: Any, expected: str) -> None:
    schema = state_schema(cnn_bn())
    change(schema)
    with pytest.raises(StateError) as exc:
        validate_schema(schema)
    assert expected in one_line(exc)


def test_state_schema_refuses_an_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="buffers must be one of average, local"):
        state_schema(mlp(), buffers="fedbn")


def _bytes_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k.encode(): _bytes_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bytes_keys(v) for v in value]
    return value.encode() if isinstance(value, str) else value
