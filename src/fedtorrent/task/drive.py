"""Running a :class:`Task` on one node's tensors: local training and evaluation, no networking.

What a real peer (and later the simulator's per-node loop) calls for a task session; the built-in
sessions keep :func:`fedtorrent.training.train_local` and :func:`fedtorrent.training.evaluate`.
The task's own functions are called through :func:`~fedtorrent.task.contract.call_user`, so a
failure in them is one line naming the function, with the user's exception chained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fedtorrent.config import TrainConfig
from fedtorrent.errors import ConfigError
from fedtorrent.privacy.dp_sgd import ExampleDP, check_private_model, poisson_batches, private_step
from fedtorrent.task.contract import (
    Batch,
    Task,
    TrainContext,
    TrainStepFn,
    call_user,
    callable_name,
)
from fedtorrent.training.local import _batches, num_batches

EVAL_BATCH = 1024
"""Examples per forward pass when evaluating; outputs are joined before the metrics run."""


def train_task(
    task: Task,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: TrainConfig,
    *,
    generator: torch.Generator,
    round: int,
    lr_scale: float = 1.0,
    step_generator: torch.Generator | None = None,
    dp: ExampleDP | None = None,
    noise: torch.Generator | None = None,
) -> float:
    """Train ``model`` in place with the task's optimizer and step; the mean training loss.

    Batches are drawn exactly as :func:`~fedtorrent.training.train_local` draws them
    (``config.epochs`` shuffled passes, or ``config.steps`` batches, from ``generator``). The
    optimizer is ``task.make_optimizer`` (the task's, else ``config``'s), made fresh for the call;
    the steps are :func:`run_steps`. ``ctx.round == round`` (0-based) and ``ctx.generator`` is
    ``step_generator`` (default ``generator``; a peer and the simulator pass the node's
    ``Stream.STEP`` generator, so a step's draws never move the batch order).

    With ``dp`` (example-level DP) the steps are :func:`private_step_fn`'s on ``dp.steps``
    Poisson batches from ``generator``, with gradient noise from ``noise``.

    Returns:
        The example-weighted mean of the losses the steps returned; NaN when no batch ran.

    Raises:
        ConfigError: the optimizer or step failed, a step returned no scalar tensor, or ``dp``
            for a task with its own ``train_step`` or without ``noise``.
        PrivacyError: a model DP-SGD cannot train (BatchNorm, or one torch.func cannot batch).
    """
    count = int(x.shape[0])
    total = num_batches(count, config) if dp is None else dp.steps * (count > 0)
    if total == 0:
        return math.nan
    step_fn = task.step_fn
    if dp is not None:
        if noise is None:
            raise ConfigError("example-level DP needs a noise generator")
        step_fn = private_step_fn(task, model, dp, examples=count, noise=noise)
    optimizer = task.make_optimizer(model.parameters(), config)
    ctx = TrainContext(
        device=x.device,
        round=round,
        generator=generator if step_generator is None else step_generator,
        loss=task.loss_fn,
        optimizer=optimizer,
    )
    batches = (
        list(_batches(count, config, generator, total))
        if dp is None
        else poisson_batches(count, dp, generator)
    )
    return run_steps(
        step_fn, model, x, y, batches,
        ctx=ctx, lr_scale=lr_scale, cosine=config.lr_schedule == "cosine",
    )  # fmt: skip


def private_step_fn(
    task: Task | None, model: nn.Module, dp: ExampleDP, *, examples: int, noise: torch.Generator
) -> TrainStepFn:
    """The DP-SGD step for :func:`run_steps`: :func:`~fedtorrent.privacy.dp_sgd.private_step`.

    It uses ``ctx.loss`` and ``ctx.optimizer``; ``examples`` is the node's training set size (the
    expected batch is ``dp.sample_rate * examples``) and the noise comes from ``noise``.

    Raises:
        ConfigError: ``task`` has its own ``train_step`` (we cannot clip inside user code).
        PrivacyError: a model with BatchNorm.
    """
    if task is not None and task.train_step is not None:
        raise ConfigError(
            f"example-level DP cannot run Task.train_step {callable_name(task.train_step)}: it "
            "clips every example's gradient itself (drop train_step, or use unit 'node')"
        )
    check_private_model(model)
    expected = dp.expected_batch(examples)

    def step(model: nn.Module, batch: Batch, ctx: TrainContext) -> Tensor:
        return private_step(
            model, *batch, loss=ctx.loss, optimizer=ctx.optimizer, dp=dp,
            expected_batch=expected, generator=noise,
        )  # fmt: skip

    step.__qualname__ = "(DP-SGD)"  # how run_steps's messages name it
    return step


def run_steps(
    step_fn: Callable[..., object],
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batches: Sequence[Tensor],
    *,
    ctx: TrainContext,
    lr_scale: float,
    cosine: bool,
) -> float:
    """The local-training loop of both drivers (a peer, the simulator's per-node path).

    Batch ``b`` (indices into ``x``, ``y``) is one call ``step_fn(model, (x[b], y[b]), ctx)``
    with every group of ``ctx.optimizer`` at its initial rate times ``lr_scale``, and with
    ``cosine`` times ``0.5 (1 + cos(pi step / len(batches)))``.

    Returns:
        The example-weighted mean of the losses the steps returned; NaN when no batch ran (or
        every batch was empty).

    Raises:
        ConfigError: the step failed or returned no scalar tensor.
    """
    if not batches:
        return math.nan
    optimizer, total = ctx.optimizer, len(batches)
    base = [float(group["lr"]) * lr_scale for group in optimizer.param_groups]
    where = f"Task.train_step {callable_name(step_fn)}"
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64)
    seen = 0
    for step, indices in enumerate(batches):
        factor = 0.5 * (1 + math.cos(math.pi * step / total)) if cosine else 1.0
        for group, rate in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = rate * factor
        batch = indices.to(x.device)
        loss = call_user(where, step_fn, model, (x[batch], y[batch]), ctx, error=ConfigError)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ConfigError(f"{where} must return the batch's loss as a scalar tensor")
        loss_sum += loss.detach().to("cpu", torch.float64).reshape(()) * len(batch)
        seen += len(batch)
    return float(loss_sum) / seen if seen else math.nan


def evaluate_task(task: Task, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float] | None:
    """The task's metrics and its loss (key ``loss``) of ``model`` on a whole split.

    The model runs in eval mode without gradients, :data:`EVAL_BATCH` examples at a time on its
    own device (outputs are joined on ``y``'s device); the
    metrics and the loss are computed once on the joined outputs (so macro scores are right).
    A metric the task calls ``loss`` is replaced by the task's loss.

    Returns:
        ``{metric: value, ..., "loss": value}`` as floats; None when the split is empty.

    Raises:
        ConfigError: the metrics failed or returned something that is not names to numbers.
    """
    count = int(x.shape[0])
    if count == 0:
        return None
    model.eval()
    device = next((p.device for p in model.parameters()), x.device)
    with torch.no_grad():  # each chunk runs where the model is; scores are computed beside y
        output = torch.cat(
            [
                model(x[i : i + EVAL_BATCH].to(device)).to(y.device)
                for i in range(0, count, EVAL_BATCH)
            ]
        )
        loss = float(task.loss_fn(output, y))
        where = f"Task.metrics {callable_name(task.metrics_fn)}"
        scores = call_user(where, task.metrics_fn, output, y, error=ConfigError)
    if not isinstance(scores, dict):
        raise ConfigError(f"{where} returned {type(scores).__name__}, not a dict of name: number")
    try:
        values = {str(name): float(value) for name, value in scores.items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} returned a value that is not a number: {exc}") from exc
    return {**values, "loss": loss}
