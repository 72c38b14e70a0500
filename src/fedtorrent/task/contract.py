"""The training contract: a :class:`Task` (model, data, loss, metrics, optimizer, step), its data.

A task is the user's own code, handed to fedtorrent as functions that it calls::

    task = ft.Task(model=make_model, data=load_node, loss=F.mse_loss)
    ft.NodeData(train=(x, y), val=(x, y), test=(x, y))

Both classes are frozen and check themselves when built, raising one line that names the field:
:class:`~fedtorrent.errors.ConfigError` for a task whose parts are not what the contract asks,
:class:`~fedtorrent.errors.DataError` for data of the wrong type, length or values. Calling the
user's functions goes through :meth:`Task.make_model` and :meth:`Task.node_data`, which turn any
exception from them into one such line and keep the original chained (``__cause__``) and logged.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional
from torch.utils.data import Dataset, IterableDataset

from fedtorrent.config import TrainConfig
from fedtorrent.errors import ConfigError, DataError, FedTorrentError
from fedtorrent.state.schema import BUFFER_POLICIES, dtype_name
from fedtorrent.training.evaluate import classification_metrics
from fedtorrent.training.local import make_optimizer

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")

Batch: TypeAlias = tuple[Tensor, Tensor]
LossFn: TypeAlias = Callable[[Tensor, Tensor], Tensor]
MetricsFn: TypeAlias = Callable[[Tensor, Tensor], Mapping[str, float]]
OptimizerFn: TypeAlias = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
Split: TypeAlias = "tuple[Tensor, Tensor] | Dataset[Any]"
"""A split as :class:`NodeData` holds it: ``(x, y)`` tensors, or the user's map-style Dataset."""
_MESSAGE_LIMIT = 300


@dataclass(frozen=True, eq=False)
class TrainContext:
    """What a ``train_step`` gets besides the model and the batch; built by the driver per call.

    Attributes:
        device: where the model and the batch are.
        round: the 0-based round being trained.
        generator: a CPU generator seeded for this node and round; draw any randomness (dropout
            masks aside, which use torch's global generator) from it to stay reproducible.
        loss: the task's loss (``Task.loss`` or cross-entropy).
        optimizer: this round's optimizer over the model's parameters; the step calls
            ``zero_grad``, ``backward`` and ``step`` itself (see :func:`default_train_step`).
    """

    device: torch.device
    round: int
    generator: torch.Generator
    loss: LossFn
    optimizer: torch.optim.Optimizer


TrainStepFn: TypeAlias = Callable[[nn.Module, Batch, TrainContext], Tensor]


def default_train_step(model: nn.Module, batch: Batch, ctx: TrainContext) -> Tensor:
    """One optimizer step on ``batch``: zero grads, loss, backward, step; the loss, detached.

    A custom ``train_step`` has the same contract: it owns the whole step (so it can clip
    gradients or smooth labels between ``backward`` and ``step``) and returns the batch's mean loss
    as a scalar tensor.
    """
    x, y = batch
    ctx.optimizer.zero_grad(set_to_none=True)
    loss = ctx.loss(model(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    ctx.optimizer.step()
    return loss.detach()


def cross_entropy_metrics(output: Tensor, target: Tensor) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 of class scores ``output`` against ``target``.

    ``output`` is (N, C) or (N, C, d1, ...) as :func:`torch.nn.functional.cross_entropy` takes it;
    ``target`` holds class indices of shape (N,) or (N, d1, ...), or class probabilities shaped
    like ``output`` (scored by their argmax). Scores are those of
    :func:`fedtorrent.training.evaluate.classification_metrics` over every position.
    """
    if output.ndim < 2:
        raise DataError(f"cross-entropy metrics need (N, C) outputs, got shape {shape_of(output)}")
    predicted = output.argmax(dim=1).reshape(-1)
    true = target.argmax(dim=1) if target.is_floating_point() else target
    scores = classification_metrics(
        true.reshape(-1).to("cpu", torch.int64),
        predicted.to("cpu"),
        num_classes=int(output.shape[1]),
    )
    return {
        "accuracy": scores.accuracy,
        "precision": scores.precision,
        "recall": scores.recall,
        "f1": scores.f1,
    }


@dataclass(frozen=True, eq=False)  # tensors inside: compare by identity
class NodeData:
    """One node's examples: ``train`` always, ``val`` and ``test`` when the task has them.

    Each split is ``(x, y)``, two torch tensors or numpy arrays of any shape and dtype with the
    same number of rows, or a map-style ``torch.utils.data.Dataset`` whose items are ``(x, y)``.
    Arrays become tensors without a copy (read-only arrays included: fedtorrent never writes to
    data); dtypes are kept as given, so float64 arrays stay float64 (convert them to the model's
    dtype, usually ``np.float32``). A Dataset is kept as it is and read item by item.

    Checked when built: every split is non-empty, ``x`` and ``y`` agree in length, floating values
    are finite, and the per-example shapes and dtypes of ``val`` and ``test`` equal ``train``'s
    (for a Dataset, as seen on its first item).

    Raises:
        DataError: a split of the wrong type, empty, with lengths that disagree, holding NaN or
            infinite values, or shaped unlike ``train``.
    """

    train: Split
    val: Split | None = None
    test: Split | None = None

    def __post_init__(self) -> None:
        reference: str | None = None  # train's per-example shapes and dtypes
        for name in SPLIT_NAMES:
            value = getattr(self, name)
            if value is None:
                if name == "train":
                    raise DataError("NodeData.train is required")
                continue
            split = _normalize_split(value, f"NodeData.{name}")
            object.__setattr__(self, name, split)
            first_x, first_y = _first_example(split, f"NodeData.{name}")
            spec = f"x {shape_of(first_x)} {dtype_name(first_x.dtype)}, " + (
                f"y {shape_of(first_y)} {dtype_name(first_y.dtype)}"
            )
            if reference is None:
                reference = spec
            elif spec != reference:
                raise DataError(f"NodeData.{name} examples are {spec}, but train's are {reference}")

    def split(self, name: str) -> Split | None:
        """The split called ``name`` (``train``, ``val`` or ``test``); None when not given."""
        if name not in SPLIT_NAMES:
            raise ConfigError(f"split must be one of {', '.join(SPLIT_NAMES)}; got {name!r}")
        value: Split | None = getattr(self, name)
        return value

    def size(self, name: str) -> int:
        """How many examples split ``name`` holds (0 when it is not given)."""
        split = self.split(name)
        if split is None:
            return 0
        return int(split[0].shape[0]) if isinstance(split, tuple) else len(split)  # type: ignore[arg-type]

    def take(self, name: str, indices: Sequence[int] | Tensor) -> Batch:
        """The examples at ``indices`` of split ``name`` as ``(x, y)`` tensors.

        Tensors are indexed (a copy); Dataset items are read and stacked, and each is checked
        like tensors are (types, finite values).

        Raises:
            ConfigError: the split is not given.
            DataError: a Dataset item is not an ``(x, y)`` pair of numbers, or is not finite.
        """
        split = self.split(name)
        if split is None:
            raise ConfigError(f"this node has no {name} split")
        index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if isinstance(split, tuple):
            x, y = split
            return x[index.to(x.device)], y[index.to(y.device)]
        items = [_dataset_item(split, int(i), f"NodeData.{name}") for i in index]
        if not items:
            x0, y0 = _first_example(split, f"NodeData.{name}")
            return x0.new_empty((0, *x0.shape)), y0.new_empty((0, *y0.shape))
        try:
            return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
        except RuntimeError as exc:
            raise DataError(
                f"NodeData.{name} items differ in shape and cannot be stacked: {_first_line(exc)}"
            ) from exc

    def tensors(self, name: str) -> Batch:
        """All of split ``name`` as ``(x, y)`` tensors (a Dataset is read whole)."""
        split = self.split(name)
        if isinstance(split, tuple):
            return split
        return self.take(name, range(self.size(name)))


@dataclass(frozen=True, eq=False)  # functions inside: compare by identity
class Task:
    """A learning problem as functions fedtorrent calls: the contract of simulator and peers alike.

    Attributes:
        model: ``() -> nn.Module``, a fresh model each call (any architecture, buffers allowed).
            Drivers seed torch's global generator before calling it (:meth:`make_model`), so the
            same seed builds the same weights.
        data: ``(node, num_nodes) -> NodeData``, node ``node``'s examples when the data is split
            ``num_nodes`` ways. A real peer that owns its data may ignore both arguments.
        loss: ``(output, target) -> scalar tensor``, the mean loss of a batch; None is
            cross-entropy on class indices (or class probabilities).
        metrics: ``(output, target) -> {name: float}`` on a whole split's outputs at once (not
            per batch, so macro scores are right); None gives, for cross-entropy,
            :func:`cross_entropy_metrics` (accuracy, macro precision / recall / F1) and, for any
            other loss, no metrics beyond the loss.
        optimizer: ``(parameters) -> torch.optim.Optimizer``; None uses the run's
            :class:`~fedtorrent.config.TrainConfig` (see :meth:`make_optimizer`).
        train_step: ``(model, batch, ctx) -> loss tensor``, one whole optimizer step for custom
            loops (see :func:`default_train_step`, the one used when None).
        buffers: ``"average"`` mixes floating buffers (BatchNorm running statistics) like
            parameters, integer ones exactly; ``"local"`` keeps every buffer per node (FedBN).

    A task also remembers the module it was made in (the first caller outside fedtorrent), so
    :func:`~fedtorrent.task.task_spec` can name it for peer processes when it is a module-level
    variable there; :func:`~fedtorrent.task.load_task` records the spec it loaded a task from.

    Raises:
        ConfigError: a part that is not callable as the contract says, a model given as a built
            module instead of a factory, or an unknown ``buffers`` policy.
    """

    model: Callable[[], nn.Module]
    data: Callable[[int, int], NodeData]
    loss: LossFn | None = None
    metrics: MetricsFn | None = None
    optimizer: OptimizerFn | None = None
    train_step: TrainStepFn | None = None
    buffers: str = "average"

    def __post_init__(self) -> None:
        if isinstance(self.model, nn.Module):
            raise ConfigError(
                "Task.model must be a function that builds a fresh nn.Module (model=Net or "
                "model=lambda: Net()), not a built module"
            )
        if isinstance(self.data, NodeData):
            raise ConfigError(
                "Task.data must be a function (node, num_nodes) -> NodeData, not a NodeData "
                "(wrap it: data=lambda node, num_nodes: node_data)"
            )
        if isinstance(self.optimizer, torch.optim.Optimizer):
            raise ConfigError(
                "Task.optimizer must be a function (parameters) -> optimizer, e.g. "
                "lambda params: torch.optim.Adam(params, lr=1e-3), not a built optimizer"
            )
        _require_callable("model", self.model, "()")
        _require_callable("data", self.data, "(node, num_nodes)", arity=2)
        for name, signature, arity in (
            ("loss", "(output, target)", 2),
            ("metrics", "(output, target)", 2),
            ("optimizer", "(parameters)", 1),
            ("train_step", "(model, batch, ctx)", 3),
        ):
            value = getattr(self, name)
            if value is not None:
                _require_callable(name, value, signature, arity=arity)
        if self.buffers not in BUFFER_POLICIES:
            raise ConfigError(
                f"Task.buffers must be one of {', '.join(BUFFER_POLICIES)}; got {self.buffers!r}"
            )
        object.__setattr__(self, "_defined_in", _caller_module())

    @property
    def uses_cross_entropy(self) -> bool:
        """True when the loss is cross-entropy (the default, ``F.cross_entropy`` or the module)."""
        return (
            self.loss is None
            or self.loss is functional.cross_entropy
            or isinstance(self.loss, nn.CrossEntropyLoss)
        )

    @property
    def loss_fn(self) -> LossFn:
        """The loss drivers use: ``loss``, or cross-entropy when it is None."""
        return self.loss if self.loss is not None else functional.cross_entropy

    @property
    def metrics_fn(self) -> MetricsFn:
        """The metrics drivers report: ``metrics``, else the defaults described on the class."""
        if self.metrics is not None:
            return self.metrics
        return cross_entropy_metrics if self.uses_cross_entropy else _no_metrics

    @property
    def step_fn(self) -> TrainStepFn:
        """The step drivers run: ``train_step``, or :func:`default_train_step`."""
        return self.train_step if self.train_step is not None else default_train_step

    def make_model(self, *, seed: int | None = None) -> nn.Module:
        """Call ``model()``; with ``seed``, under ``torch.manual_seed(seed)`` in a forked RNG.

        Raises:
            ConfigError: the factory raised (the exception is chained and logged) or returned
                something that is not an ``nn.Module``.
        """
        where = f"Task.model {callable_name(self.model)}"
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            net = call_user(where, self.model, error=ConfigError)
        if not isinstance(net, nn.Module):
            raise ConfigError(f"{where} returned {type(net).__name__}, not a torch.nn.Module")
        return net

    def node_data(self, node: int, num_nodes: int) -> NodeData:
        """Call ``data(node, num_nodes)`` and check that it returned a :class:`NodeData`.

        Raises:
            ConfigError: ``node`` is not in ``[0, num_nodes)``.
            DataError: the function raised (chained and logged; a fedtorrent error keeps its
                kind) or returned something else than a ``NodeData``.
        """
        if not 0 <= node < num_nodes:
            raise ConfigError(f"node must be in [0, {num_nodes}), got {node}")
        where = f"Task.data {callable_name(self.data)}({node}, {num_nodes})"
        result = call_user(where, self.data, node, num_nodes, error=DataError)
        if not isinstance(result, NodeData):
            raise DataError(f"{where} returned {type(result).__name__}, not fedtorrent.NodeData")
        return result

    def make_optimizer(
        self, parameters: Iterable[nn.Parameter], config: TrainConfig
    ) -> torch.optim.Optimizer:
        """``optimizer(parameters)``, or the one ``config`` names when the task has none.

        Raises:
            ConfigError: the factory raised or did not return a ``torch.optim.Optimizer``.
        """
        if self.optimizer is None:
            return make_optimizer(parameters, config)
        where = f"Task.optimizer {callable_name(self.optimizer)}"
        optimizer = call_user(where, self.optimizer, parameters, error=ConfigError)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"{where} returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
            )
        return optimizer


def _caller_module() -> str | None:
    """The ``__name__`` of the innermost caller outside fedtorrent and dataclasses, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__")
        if isinstance(name, str) and not (
            name.startswith("fedtorrent.") or name in ("fedtorrent", "dataclasses")
        ):
            return name
        frame = frame.f_back  # type: ignore[assignment]
    return None


def call_user(
    where: str, function: Callable[..., Any], *args: Any, error: type[FedTorrentError]
) -> Any:
    """``function(*args)``, the user's code: any exception becomes one line of kind ``error``.

    The line starts with ``where``. The original exception is chained as ``__cause__`` and logged
    at INFO with its traceback (a peer's log file keeps it; a terminal shows only the line). A
    fedtorrent error raised inside (for example a :class:`NodeData` that does not check) keeps its
    own message after ``where`` and becomes a ``ConfigError`` or ``DataError`` like it.
    """
    try:
        return function(*args)
    except FedTorrentError as exc:
        kind = ConfigError if isinstance(exc, ConfigError) else DataError
        raise kind(f"{where}: {_clip(str(exc))}") from exc
    except Exception as exc:
        log.info("%s raised", where, exc_info=True)
        raise error(f"{where} failed: {describe_exception(exc)}") from exc


def describe_exception(exc: BaseException) -> str:
    """``Type: first line of the message``, clipped: an exception as part of one line."""
    return _clip(f"{type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _clip(text: str) -> str:
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."


def _no_metrics(output: Tensor, target: Tensor) -> dict[str, float]:
    return {}


def callable_name(function: object) -> str:
    """How messages name a user function: its qualified name, else its type."""
    return str(getattr(function, "__qualname__", None) or type(function).__name__)


def _require_callable(field: str, value: object, signature: str, *, arity: int = 0) -> None:
    if not callable(value):
        raise ConfigError(
            f"Task.{field} must be a function {signature}, got {type(value).__name__}"
        )
    try:
        inspect.signature(value).bind(*range(arity))
    except TypeError:
        raise ConfigError(
            f"Task.{field} {callable_name(value)} cannot be called as {signature}"
        ) from None  # our own check; there is no user exception to keep
    except ValueError:  # no introspectable signature (a builtin): the call will tell
        pass


def shape_of(tensor: Tensor) -> tuple[int, ...]:
    """A tensor's shape as a tuple of ints, as messages print it."""
    return tuple(int(d) for d in tensor.shape)


def _as_tensor(value: object, what: str) -> Tensor:
    """A tensor of ``value`` (tensor, numpy array or Python number) sharing memory where it can."""
    if isinstance(value, Tensor):
        tensor = value.detach()
    elif isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        if array.dtype.kind not in "biufc":
            raise DataError(f"{what} has numpy dtype {array.dtype}; give numbers")
        if not array.flags.c_contiguous:  # torch cannot view negative strides
            array = np.ascontiguousarray(array)
        with warnings.catch_warnings():  # read-only arrays are fine: data is never written
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
    elif isinstance(value, bool | int | float):
        tensor = torch.tensor(value)
    else:
        raise DataError(f"{what} must be a torch tensor or numpy array, got {type(value).__name__}")
    if (tensor.is_floating_point() or tensor.is_complex()) and not bool(
        torch.isfinite(tensor).all()
    ):
        raise DataError(f"{what} holds NaN or infinite values")
    return tensor


def _normalize_split(value: object, what: str) -> Split:
    if isinstance(value, IterableDataset):
        raise DataError(f"{what} is an IterableDataset; give a map-style Dataset or (x, y)")
    if isinstance(value, Dataset):
        try:
            length = len(value)  # type: ignore[arg-type]
        except TypeError as exc:
            raise DataError(f"{what} is a Dataset without __len__; give a map-style one") from exc
        if length < 1:
            raise DataError(f"{what} is an empty Dataset")
        return value
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise DataError(
            f"{what} must be (x, y) or a map-style torch Dataset, got {type(value).__name__}"
            + (f" of length {len(value)}" if isinstance(value, tuple | list) else "")
        )
    x, y = _as_tensor(value[0], f"{what} x"), _as_tensor(value[1], f"{what} y")
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(f"{what} x and y need a first (example) dimension; got a 0-d value")
    if int(x.shape[0]) != int(y.shape[0]):
        raise DataError(f"{what} x has {int(x.shape[0])} examples but y has {int(y.shape[0])}")
    if int(x.shape[0]) == 0:
        raise DataError(f"{what} holds no examples")
    return x, y


def _first_example(split: Split, what: str) -> Batch:
    if isinstance(split, tuple):
        x, y = split
        return x[0], y[0]
    return _dataset_item(split, 0, what)


def _dataset_item(dataset: Dataset[Any], index: int, what: str) -> Batch:
    item = call_user(f"{what}[{index}]", dataset.__getitem__, index, error=DataError)
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise DataError(f"{what}[{index}] must be an (x, y) pair, got {type(item).__name__}")
    return _as_tensor(item[0], f"{what}[{index}] x"), _as_tensor(item[1], f"{what}[{index}] y")


def is_finite_scalar(value: object) -> bool:
    """True for a tensor with exactly one element that is finite."""
    return (
        isinstance(value, Tensor)
        and value.numel() == 1
        and (not value.is_floating_point() or math.isfinite(float(value.detach())))
    )
