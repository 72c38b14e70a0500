"""Try a task once on a small batch before any run, so a mistake is one line, not a traceback.

:func:`check_task` builds the model, calls ``data``, and runs the model, the loss, the metrics
and one training step on the first examples of ``train``, in the order a run would. The first
problem found is raised as one line that names it (a ``DataError`` for the data and what the
model makes of it, a ``ConfigError`` for the task's own functions); the user's exception, if any,
is chained and logged.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fedtorrent.config import TrainConfig
from fedtorrent.errors import ConfigError, DataError
from fedtorrent.state.schema import dtype_name, state_schema
from fedtorrent.task.contract import (
    SPLIT_NAMES,
    NodeData,
    Task,
    TrainContext,
    call_user,
    callable_name,
    describe_exception,
    is_finite_scalar,
    shape_of,
)

CHECK_BATCH = 8
"""Examples of ``train`` the check runs the model on."""


@dataclass(frozen=True)
class TaskReport:
    """What :func:`check_task` saw: JSON-ready facts a driver can print or record.

    Attributes:
        sizes: examples per split (0 for one not given).
        input_shape: one training example's shape; ``input_dtype`` its dtype.
        output_shape: the model's output for one example (the batch dimension dropped).
        num_classes: the classes the model scores, for cross-entropy; None otherwise.
        loss: the loss on the check batch, before the training step.
        metrics: the names the task's metrics return, sorted.
        schema: the model's :func:`~fedtorrent.state.schema.state_schema`.
    """

    sizes: dict[str, int]
    input_shape: tuple[int, ...]
    input_dtype: str
    output_shape: tuple[int, ...]
    num_classes: int | None
    loss: float
    metrics: tuple[str, ...]
    schema: dict[str, Any]


def check_task(
    task: Task,
    *,
    node: int = 0,
    num_nodes: int = 1,
    device: str | torch.device = "cpu",
    train: TrainConfig | None = None,
) -> TaskReport:
    """Run ``task`` once for node ``node`` of ``num_nodes`` on a batch of its training examples.

    Checks, in order: the model builds; ``data`` returns a valid :class:`NodeData`; the model runs
    on the first :data:`CHECK_BATCH` training inputs and returns a finite tensor; for
    cross-entropy, targets are integer class indices within the model's output classes (in every
    split given as tensors, in the batch for a Dataset) or class probabilities shaped like the
    output; the loss is a finite scalar that depends on the parameters and does not broadcast
    mismatched shapes; the metrics return a mapping of names to numbers; one training step (the
    task's ``train_step`` with its optimizer, or ``train``'s) returns a finite scalar. The model
    used is a throwaway: nothing of the task is changed.

    Raises:
        DataError: data of the wrong type or values, shapes that do not fit the model, labels
            outside the classes, a model or loss that fails on the batch.
        ConfigError: a model factory, metrics, optimizer or train step that fails or returns the
            wrong type; an unknown device.
    """
    try:
        target_device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: {describe_exception(exc)}") from exc
    model = task.make_model(seed=0).to(target_device)
    data = task.node_data(node, num_nodes)
    x, y = data.take("train", range(min(CHECK_BATCH, data.size("train"))))
    x, y = x.to(target_device), y.to(target_device)
    where = f"node {node} of {num_nodes}"
    output = _forward(model, x, where)
    num_classes = _check_classes(task, data, output, y, where) if task.uses_cross_entropy else None
    loss = _loss(task, output, y, where)
    names = _metric_names(task, output.detach(), y)
    _train_once(task, model, (x, y), target_device, train or TrainConfig())
    return TaskReport(
        sizes={name: data.size(name) for name in SPLIT_NAMES},
        input_shape=shape_of(x)[1:],
        input_dtype=_dtype(x),
        output_shape=shape_of(output)[1:],
        num_classes=num_classes,
        loss=loss,
        metrics=names,
        schema=state_schema(model, buffers=task.buffers),  # structure only: values do not matter
    )


def _forward(model: nn.Module, x: Tensor, where: str) -> Tensor:
    model.train()
    try:
        output = model(x)
    except Exception as exc:
        raise DataError(
            f"{where}: the model fails on a train batch x {shape_of(x)} {_dtype(x)}: "
            f"{describe_exception(exc)}{_dtype_hint(model, x, exc)}"
        ) from exc
    if not isinstance(output, Tensor):
        raise DataError(f"{where}: the model returned {type(output).__name__}, not a tensor")
    if output.ndim == 0 or int(output.shape[0]) != int(x.shape[0]):
        raise DataError(
            f"{where}: the model maps a batch x {shape_of(x)} to {shape_of(output)}; "
            "its first dimension must stay the batch"
        )
    if (output.is_floating_point() or output.is_complex()) and not bool(
        torch.isfinite(output).all()
    ):
        raise DataError(f"{where}: the model's output on a train batch is NaN or infinite")
    return output


def _check_classes(task: Task, data: NodeData, output: Tensor, y: Tensor, where: str) -> int:
    """The class count of a cross-entropy task; every label checked against it."""
    if output.ndim < 2:
        raise DataError(
            f"{where}: cross-entropy needs class scores (N, C) from the model, "
            f"got {shape_of(output)}"
        )
    num_classes = int(output.shape[1])
    if y.is_floating_point():
        if y.shape != output.shape:
            raise DataError(
                f"{where}: cross-entropy needs integer class labels or class probabilities "
                f"shaped like the output {shape_of(output)}; got {_dtype(y)} targets "
                f"{shape_of(y)} (convert labels to int64, or pass loss=)"
            )
        return num_classes
    expected = (int(output.shape[0]), *output.shape[2:])
    if tuple(y.shape) != expected:
        raise DataError(
            f"{where}: cross-entropy targets must have shape {expected} for output "
            f"{shape_of(output)}, got {shape_of(y)}"
        )
    if y.dtype == torch.bool or y.is_complex():
        raise DataError(f"{where}: class labels must be integers, got {_dtype(y)}")
    for name in SPLIT_NAMES:
        split = data.split(name)
        labels = split[1] if isinstance(split, tuple) else (y if name == "train" else None)
        if labels is None or labels.numel() == 0:
            continue
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise DataError(
                f"{where}: {name} holds label {bad}, outside the model's {num_classes} classes "
                f"[0, {num_classes})"
            )
    return num_classes


def _loss(task: Task, output: Tensor, y: Tensor, where: str) -> float:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loss = task.loss_fn(output, y)
        except Exception as exc:
            hint = ""
            if task.uses_cross_entropy and not y.is_floating_point() and y.dtype != torch.int64:
                hint = " (cross-entropy takes int64 labels: y.astype(np.int64))"
            raise DataError(
                f"{where}: the loss fails on output {shape_of(output)} {_dtype(output)} and "
                f"targets {shape_of(y)} {_dtype(y)}: {describe_exception(exc)}{hint}"
            ) from exc
    broadcast = next((w for w in caught if "broadcast" in str(w.message)), None)
    if broadcast is not None:
        raise DataError(
            f"{where}: the loss broadcasts output {shape_of(output)} against targets "
            f"{shape_of(y)}, which gives wrong results; make their shapes equal "
            "(reshape y or the output)"
        )
    if not is_finite_scalar(loss):
        what = (
            f"a tensor of shape {shape_of(loss)}"
            if isinstance(loss, Tensor)
            else type(loss).__name__
        )
        raise DataError(f"{where}: the loss must be a finite scalar tensor, got {what}")
    if not loss.requires_grad:
        raise DataError(
            f"{where}: the loss does not depend on the model's parameters (no gradient flows; "
            "is it computed with .item(), argmax or under no_grad?)"
        )
    return float(loss.detach())


def _metric_names(task: Task, output: Tensor, y: Tensor) -> tuple[str, ...]:
    where = f"Task.metrics {callable_name(task.metrics_fn)}"
    scores = call_user(where, task.metrics_fn, output, y, error=ConfigError)
    if not isinstance(scores, dict):
        raise ConfigError(f"{where} returned {type(scores).__name__}, not a dict of name: number")
    for name, value in scores.items():
        if not isinstance(name, str) or not name or not name.isprintable():
            raise ConfigError(f"{where} returned a metric name {name!r}; names are printable text")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: metric {name!r} is {type(value).__name__}, not a number"
            ) from None  # our own check of the returned value, not a user exception
        if math.isinf(number):
            raise ConfigError(f"{where}: metric {name!r} is infinite")
    return tuple(sorted(scores))


def _train_once(
    task: Task,
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    device: torch.device,
    config: TrainConfig,
) -> None:
    optimizer = task.make_optimizer(model.parameters(), config)
    ctx = TrainContext(
        device=device,
        round=0,
        generator=torch.Generator().manual_seed(0),
        loss=task.loss_fn,
        optimizer=optimizer,
    )
    where = f"Task.train_step {callable_name(task.step_fn)}"
    model.train()
    loss = call_user(where, task.step_fn, model, batch, ctx, error=ConfigError)
    if not is_finite_scalar(loss):
        raise ConfigError(f"{where} must return the batch's loss as a finite scalar tensor")


def _dtype(tensor: Tensor) -> str:
    return dtype_name(tensor.dtype)


def _dtype_hint(model: nn.Module, x: Tensor, exc: Exception) -> str:
    """A hint when the failure is a dtype clash between the inputs and the parameters."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    if parameter is None or parameter.dtype == x.dtype or "type" not in str(exc):
        return ""
    return (
        f" (x is {_dtype(x)}, the model's parameters {_dtype(parameter)}: convert x, "
        "e.g. with .astype(np.float32))"
    )
