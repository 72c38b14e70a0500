"""Local training: minibatch SGD or Adam on one node's tensors; no networking, no printing."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional

from fedtorrent.config import TrainConfig
from fedtorrent.errors import ConfigError
from fedtorrent.privacy.dp_sgd import ExampleDP, check_private_model, poisson_batches, private_step

BatchCallback = Callable[[int, int], None]
"""Called after each batch with (batches done, batches in this call)."""


def make_optimizer(
    parameters: Iterable[nn.Parameter], config: TrainConfig
) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, with its rate, momentum (SGD) and weight decay."""
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def num_batches(num_examples: int, config: TrainConfig) -> int:
    """How many batches :func:`train_local` runs on ``num_examples`` examples (0 when empty)."""
    if num_examples == 0:
        return 0
    if config.steps is not None:
        return config.steps
    return config.epochs * math.ceil(num_examples / config.batch_size)


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    generator: torch.Generator | None = None,
    on_batch: BatchCallback | None = None,
    dp: ExampleDP | None = None,
    noise: torch.Generator | None = None,
) -> float:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy; return the mean training loss.

    Runs ``config.epochs`` shuffled passes, or exactly ``config.steps`` batches when set (cycling
    through reshuffled passes as needed); the last batch of a pass may be smaller. Shuffling draws
    from ``generator`` (a CPU generator), else from a fresh one seeded with ``config.seed``, so the
    same model, data and config give the same result. A new optimizer is made on every call: Adam
    moments and SGD momentum do not carry over between calls, and ``cosine`` decays the rate to 0
    over this call's batches.

    With ``dp`` (example-level DP), the call runs ``dp.steps`` DP-SGD steps instead
    (:func:`fedtorrent.privacy.dp_sgd.private_step`) on batches Poisson-sampled from
    ``generator``, with gradient noise drawn from ``noise``.

    Returns:
        The example-weighted mean loss over all batches run, or NaN when none ran (no data,
        ``epochs == 0``, or only empty Poisson batches).

    Raises:
        ConfigError: ``x`` and ``y`` differ in length, or ``dp`` without ``noise``.
        PrivacyError: a model DP-SGD cannot train (BatchNorm).
    """
    count = int(x.shape[0])
    if int(y.shape[0]) != count:
        raise ConfigError(f"x has {count} examples but y has {int(y.shape[0])}")
    total = num_batches(count, config) if dp is None else dp.steps * (count > 0)
    if total == 0:
        return math.nan
    if generator is None:
        generator = torch.Generator().manual_seed(config.seed)
    if dp is not None:
        if noise is None:
            raise ConfigError("example-level DP needs a noise generator")
        check_private_model(model)
    batches = (
        _batches(count, config, generator, total)
        if dp is None
        else iter(poisson_batches(count, dp, generator))
    )
    optimizer = make_optimizer(model.parameters(), config)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64)
    seen = 0
    for step, indices in enumerate(batches):
        if config.lr_schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        batch = indices.to(x.device)
        if dp is None:
            optimizer.zero_grad(set_to_none=True)
            loss = functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        else:
            assert noise is not None
            loss = private_step(
                model, x[batch], y[batch],
                loss=functional.cross_entropy, optimizer=optimizer, dp=dp,
                expected_batch=dp.expected_batch(count), generator=noise,
            )  # fmt: skip
        loss_sum += loss.detach().to("cpu", torch.float64) * len(batch)
        seen += len(batch)
        if on_batch is not None:
            on_batch(step + 1, total)
    return float(loss_sum) / seen if seen else math.nan


def _batches(
    count: int, config: TrainConfig, generator: torch.Generator, total: int
) -> Iterator[torch.Tensor]:
    """``total`` index batches from successive shuffled passes over ``range(count)``."""
    produced = 0
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, config.batch_size):
            yield order[start : start + config.batch_size]
            produced += 1
            if produced == total:
                return
