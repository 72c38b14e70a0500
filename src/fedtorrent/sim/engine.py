"""The vectorized engine: N virtual nodes whose parameters live in one ``(N, P)`` tensor.

A round is local training of every node at once, then one mixing step over the round's cohorts.
Both are batched tensor operations, never a Python loop over N models:

- **linear fast path** (``logreg``): logits ``(A, C, B)`` by one batched matmul, the softmax
  cross-entropy gradient derived by hand, batches gathered with ``index_select``;
- **general path** (any registry model): ``torch.func.functional_call`` on views of the stacked
  parameters, under ``vmap`` (or row by row for convolutional models, whose grouped ``vmap``
  kernels are slower on CPU), one autograd pass for all nodes.

Row i of ``params`` is ``state.flatten`` of node i's state dict (sorted keys), so a row can be
turned back into a state dict with ``state.unflatten(row, like)``. Memory is the stacked
parameters, one gradient and optimizer state of the same size, and one batch per node. Every
random draw comes from generators seeded by the run's seed, so a seed fixes the result.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F  # noqa: N812

from fedtorrent.config import MixingConfig, TrainConfig
from fedtorrent.errors import ConfigError
from fedtorrent.mixing.round import (
    VALIDATED_RULES,
    Cohorts,
    PrivateTrust,
    Trust,
    mix_round,
    validation_rows,
)
from fedtorrent.mixing.trust import Release, TrustDP, decay_logits, example_loss, flat_views
from fedtorrent.privacy.dp_sgd import ExampleDP, add_noise, clip_factors, poisson_batches
from fedtorrent.sim.loop import ModuleLoopBackend, has_buffers
from fedtorrent.sim.topology import Topology
from fedtorrent.training.seeds import Stream, derive_seed, node_generator

Tensor = torch.Tensor
Rows = Tensor | slice | None
"""Which rows of the stacked parameters a step touches: an index tensor, a slice, or all."""


class ShareFn(Protocol):
    """``share(params, round, *, before, public) -> (N, P)``: what each node sends its cohort.

    ``params`` are the trained ``(N, P)`` rows (never modify them); ``before`` each node's rows
    before this round's training (what it held after its last mix); ``public`` what each node's
    cohort can compute it held after the last mix: the mix of the shared rows with the node's
    own *shared* row as its own (the initial parameters before the first mix). A node always mixes
    its own true parameters for itself; adversaries and privacy noise change only what the others
    receive. A row that is not finite is rejected by every receiver (as the wire decoder does)
    and counted in ``Engine.rejected``.
    """

    def __call__(
        self, params: Tensor, round_index: int, *, before: Tensor, public: Tensor
    ) -> Tensor:
        """The rows to share."""


_EVAL_FLOATS = 32 * 2**20
"""Floats one evaluation chunk may hold (logits on the linear path, activations otherwise)."""
_BATCH_FLOATS = 2**21
"""Input floats one training step gathers at most (8 MiB): larger groups of nodes are split so a
batch stays in cache between the forward and backward passes."""
"""Floats of logits (or inputs, general path) one evaluation chunk may hold."""


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class NodeData:
    """The whole training and test sets once, and each node's rows of them as padded indices.

    ``train_index[i, :train_count[i]]`` are node i's training rows of ``x_train``; the rest of
    the row is padding (0). Same for ``val_index``.
    """

    x_train: Tensor
    y_train: Tensor
    train_index: Tensor
    train_count: Tensor
    val_index: Tensor
    val_count: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def num_nodes(self) -> int:
        """N."""
        return int(self.train_index.shape[0])


def node_data(
    *,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
) -> NodeData:
    """Pack arrays and per-node ``(train, val)`` index arrays into :class:`NodeData` (no copies)."""
    if not splits:
        raise ConfigError("need at least one node")
    return NodeData(
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        train_index=_pad([s[0] for s in splits]),
        train_count=torch.tensor([len(s[0]) for s in splits], dtype=torch.int64),
        val_index=_pad([s[1] for s in splits]),
        val_count=torch.tensor([len(s[1]) for s in splits], dtype=torch.int64),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
        num_classes=num_classes,
    )


def _pad(parts: list[np.ndarray]) -> Tensor:
    width = max(1, *(len(p) for p in parts))
    out = torch.zeros(len(parts), width, dtype=torch.int64)
    for row, part in enumerate(parts):
        out[row, : len(part)] = torch.from_numpy(np.asarray(part, dtype=np.int64))
    return out


# --------------------------------------------------------------------------------------------
# Backends: the model as functions of stacked flat parameters


class Backend(Protocol):
    """A model as functions of ``(A, P)`` stacked flat parameter rows."""

    like: dict[str, Tensor]
    num_params: int

    def prepare(self, x: Tensor) -> Tensor:
        """Inputs as this backend wants them (flattened for the linear path)."""

    def grad(self, params: Tensor, x: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
        """``(A, P)`` gradient of each row's weighted cross-entropy on its own batch.

        ``x`` is ``(A, B, ...)``, ``y`` ``(A, B)``; ``weight`` ``(A, B)`` sums to 1 per row
        (None: plain mean).
        """

    def losses(self, params: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``(A,)`` mean cross-entropy of each row on its own batch; differentiable."""

    def example_losses(self, params: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``(A, B)`` each example's loss (their mean is :meth:`losses`), in eval mode.

        Differentiable in forward mode too (a private trust fit's ``torch.func.jvp``).
        """

    def logits(self, params: Tensor, x: Tensor) -> Tensor:
        """``(A, E, C)`` logits of every row on the same inputs ``(E, ...)``; no gradients."""


class LinearBackend:
    """Multinomial logistic regression with the gradient written out: the fast path."""

    def __init__(
        self,
        like: dict[str, Tensor],
        *,
        weight_key: str,
        bias_key: str,
        order: tuple[str, str] | None = None,
    ) -> None:
        self.like = like
        self.num_params = sum(t.numel() for t in like.values())
        self.num_classes, self.num_features = like[weight_key].shape
        offsets, start = {}, 0
        for key in sorted(like):
            offsets[key] = slice(start, start + like[key].numel())
            start += like[key].numel()
        self._weight, self._bias = offsets[weight_key], offsets[bias_key]
        self._order = [offsets[key] for key in order or (weight_key, bias_key)]
        """Columns of each parameter in the model's ``named_parameters`` order (DP-SGD noise)."""

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        rows = params.shape[0]
        weight = params[:, self._weight].view(rows, self.num_classes, self.num_features)
        return weight, params[:, self._bias]

    def prepare(self, x: Tensor) -> Tensor:
        """Flatten each example."""
        return x.reshape(x.shape[0], -1)

    def _logits_t(self, params: Tensor, x: Tensor) -> Tensor:
        # (A, C, B): softmax over a middle axis of size C is far faster than over a last axis of 10.
        weight, bias = self._split(params)
        return torch.baddbmm(bias.unsqueeze(2), weight, x.transpose(1, 2))

    def _residual(self, params: Tensor, x: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
        """``(A, C, B)`` softmax minus one-hot, times each example's weight: dLoss/dlogits.

        With ``weight`` None each weight is ``1 / B``.
        """
        rows, batch = y.shape
        probs = torch.softmax(self._logits_t(params, x), dim=1)
        probs.scatter_add_(1, y.unsqueeze(1), _MINUS_ONE.expand(rows, 1, batch))
        if weight is None:
            return probs.mul_(1.0 / batch)
        return probs.mul_(weight.unsqueeze(1))

    def grad(self, params: Tensor, x: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
        """Softmax cross-entropy gradient by hand: ``(p - onehot) x`` per row."""
        return self._from_residual(self._residual(params, x, y, weight), x)

    def _from_residual(self, residual: Tensor, x: Tensor) -> Tensor:
        grad = torch.empty(residual.shape[0], self.num_params)
        grad[:, self._bias] = residual.sum(dim=2)
        grad[:, self._weight] = torch.bmm(residual, x).view(residual.shape[0], -1)
        return grad

    def private_grad(
        self,
        params: Tensor,
        x: Tensor,
        y: Tensor,
        valid: Tensor,
        *,
        dp: list[ExampleDP],
        expected: list[float],
        noise: list[torch.Generator],
    ) -> Tensor:
        """DP-SGD's gradient of each row on its Poisson batch, per-example norms in closed form.

        Example i's gradient is ``r_i x_i^T`` (weight) and ``r_i`` (bias) with ``r_i = p_i -
        onehot(y_i)``, so its squared norm is ``|r_i|^2 (|x_i|^2 + 1)`` and the clipped sum is
        one product of the rescaled residuals; ``valid`` ``(A, B)`` marks the real examples of
        the padded batches. Row a's noise is drawn from ``noise[a]`` parameter after parameter
        in the model's order, as :func:`~fedtorrent.privacy.dp_sgd.noisy_gradient` draws it.
        """
        residual = self._residual(params, x, y, valid.to(x.dtype))
        squares = residual.square().sum(dim=1) * (x.square().sum(dim=2) + 1)
        scale = torch.stack([clip_factors(row, d.clip) for row, d in zip(squares, dp, strict=True)])
        grad = self._from_residual(residual.mul_(scale.unsqueeze(1)), x)
        for row, (d, mean, generator) in enumerate(zip(dp, expected, noise, strict=True)):
            parts = [grad[row, columns] for columns in self._order]
            noisy = add_noise(parts, dp=d, expected_batch=mean, generator=generator)
            for columns, part in zip(self._order, noisy, strict=True):
                grad[row, columns] = part
        return grad

    def sgd_step(
        self, params: Tensor, x: Tensor, y: Tensor, weight: Tensor | None, *, lr: float
    ) -> None:
        """Plain SGD in place on ``params`` (a view): no gradient buffer is written at all."""
        residual = self._residual(params, x, y, weight)
        weight_t, bias = self._split(params)
        bias.sub_(residual.sum(dim=2), alpha=lr)
        # baddbmm_ into the strided view is several times slower than a product then a subtract.
        weight_t.sub_(torch.bmm(residual, x), alpha=lr)

    def losses(self, params: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy per row."""
        return self.example_losses(params, x, y).mean(dim=1)

    def example_losses(self, params: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``(A, B)`` cross-entropy of each example."""
        return F.cross_entropy(self._logits_t(params, x), y, reduction="none")

    def logits(self, params: Tensor, x: Tensor) -> Tensor:
        """One matmul for all rows: ``(E, D) @ (D, A*C)``."""
        weight, bias = self._split(params)
        rows = params.shape[0]
        flat = x @ weight.reshape(rows * self.num_classes, -1).T
        return (flat.view(-1, rows, self.num_classes) + bias).transpose(0, 1)


_MINUS_ONE = torch.full((1, 1, 1), -1.0)
"""Subtracted at each example's label by ``scatter_add_`` (expanded, never written)."""

_SPATIAL = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


class FunctionalBackend:
    """Any ``nn.Module`` via ``functional_call`` on stacked rows; gradients by one autograd pass.

    With ``vectorize`` the rows run under ``vmap`` (one batched kernel per layer). Without it the
    forward passes run row by row inside one autograd graph: ``vmap`` turns N convolutions into
    one grouped convolution and N poolings into one over N times the channels, which CPU kernels
    run 1.5 to 2.5 times slower than N separate calls (``benchmarks/sim_speed.py``). The default,
    None, vectorizes unless the model has convolution or pooling layers.
    """

    def __init__(
        self,
        model: nn.Module,
        like: dict[str, Tensor],
        *,
        vectorize: bool | None = None,
        loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.model = model
        self.like = like
        self.loss = loss
        """A task's mean loss ``(output, target) -> scalar``; None: cross-entropy (the default)."""
        self.num_params = sum(t.numel() for t in like.values())
        names = {name for name, _ in model.named_parameters()}
        self._trainable = [key in names for key in sorted(like)]
        if vectorize is None:
            vectorize = not any(isinstance(m, _SPATIAL) for m in model.modules())
        self.vectorize = vectorize
        self._own = vmap(self._forward, randomness="different")
        self._shared = vmap(self._forward, in_dims=(0, None), randomness="different")

    def _forward(self, state: dict[str, Tensor], inputs: Tensor) -> Tensor:
        out: Tensor = functional_call(self.model, state, (inputs,))
        return out

    def _each_row(self, state: dict[str, Tensor], x: Tensor, *, shared: bool) -> Tensor:
        rows = next(iter(state.values())).shape[0]
        return torch.stack(
            [
                self._forward({k: v[i] for k, v in state.items()}, x if shared else x[i])
                for i in range(rows)
            ]
        )

    def prepare(self, x: Tensor) -> Tensor:
        """Inputs as they are."""
        return x

    def _views(self, params: Tensor, frozen: Tensor) -> dict[str, Tensor]:
        live = flat_views(params, self.like)
        fixed = flat_views(frozen, self.like)
        return {
            key: live[key] if trainable else fixed[key]
            for key, trainable in zip(sorted(self.like), self._trainable, strict=True)
        }

    def _row_losses(self, state: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = self._own(state, x) if self.vectorize else self._each_row(state, x, shared=False)
        if self.loss is not None:
            return self._per_example(logits.flatten(0, 1), y.flatten(0, 1)).view(y.shape[:2])
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)

    def _per_example(self, output: Tensor, target: Tensor) -> Tensor:
        """``(E,)`` the task's mean loss of each example alone (a batch of one, under ``vmap``)."""
        return example_loss(self.loss, output, target)

    def grad(self, params: Tensor, x: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
        """Autograd through the vmapped forward of every row at once (or row by row)."""
        self.model.train()
        if not self.vectorize:
            return torch.stack(
                [
                    self._row_grad(params[i], x[i], y[i], None if weight is None else weight[i])
                    for i in range(params.shape[0])
                ]
            )
        leaf = params.detach().requires_grad_(True)
        per_example = self._row_losses(self._views(leaf, params.detach()), x, y)
        per_row = per_example.mean(dim=1) if weight is None else (per_example * weight).sum(dim=1)
        (grad,) = torch.autograd.grad(per_row.sum(), leaf)
        return grad

    def _row_grad(self, row: Tensor, x: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
        """One row's gradient with one leaf per parameter, as a plain module would have."""
        state = {k: v.detach() for k, v in flat_views(row, self.like).items()}
        keys = [
            k for k, trainable in zip(sorted(self.like), self._trainable, strict=True) if trainable
        ]
        for key in keys:
            state[key].requires_grad_(True)
        out = self._forward(state, x)
        per_example = (
            F.cross_entropy(out, y, reduction="none")
            if self.loss is None
            else self._per_example(out, y)
        )
        loss = per_example.mean() if weight is None else (per_example * weight).sum()
        grads = dict(zip(keys, torch.autograd.grad(loss, [state[k] for k in keys]), strict=True))
        return torch.cat(
            [
                grads[k].reshape(-1) if k in grads else torch.zeros(state[k].numel())
                for k in sorted(self.like)
            ]
        )

    def losses(self, params: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy per row, in eval mode."""
        return self.example_losses(params, x, y).mean(dim=1)

    def example_losses(self, params: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``(A, B)`` each example's loss, in eval mode."""
        self.model.eval()
        return self._row_losses(self._views(params, params.detach()), x, y)

    def logits(self, params: Tensor, x: Tensor) -> Tensor:
        """Eval-mode logits of every row on shared inputs."""
        self.model.eval()
        state = flat_views(params, self.like)
        with torch.no_grad():
            if self.vectorize:
                out: Tensor = self._shared(state, x)
                return out
            return self._each_row(state, x, shared=True)


def make_backend(model: nn.Module, *, input_shape: tuple[int, ...]) -> Backend:
    """The linear fast path when ``model`` is exactly ``flatten -> linear``, else the general.

    Raises:
        ConfigError: ``model`` has buffers (BatchNorm): those run on
            :class:`~fedtorrent.sim.loop.ModuleLoopBackend` (``run_one`` picks it itself).
    """
    if has_buffers(model):
        raise ConfigError(
            "a model with buffers (BatchNorm) runs on the per-node loop: ModuleLoopBackend"
        )
    like = {k: v.detach().clone() for k, v in model.state_dict().items()}
    linear = _linear_keys(model, like, input_shape)
    if linear is not None:
        names = [name for name, _ in model.named_parameters()]
        order = (
            (linear[0], linear[1])
            if names.index(linear[0]) < names.index(linear[1])
            else (linear[1], linear[0])
        )
        return LinearBackend(like, weight_key=linear[0], bias_key=linear[1], order=order)
    return FunctionalBackend(model, like)


def _linear_keys(
    model: nn.Module, like: dict[str, Tensor], input_shape: tuple[int, ...]
) -> tuple[str, str] | None:
    """``(weight_key, bias_key)`` when the model computes ``flatten(x) @ W.T + b``, else None."""
    if len(like) != 2 or any(not t.is_floating_point() for t in like.values()):
        return None
    weights = [k for k, t in like.items() if t.ndim == 2]
    biases = [k for k, t in like.items() if t.ndim == 1]
    if len(weights) != 1 or len(biases) != 1:
        return None
    w, b = like[weights[0]], like[biases[0]]
    if w.shape[0] != b.shape[0] or w.shape[1] != math.prod(input_shape):
        return None
    # Check numerically that the forward pass really is affine in the flattened input.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, *input_shape, generator=generator)
    probe = {weights[0]: torch.randn(w.shape, generator=generator), biases[0]: torch.randn(b.shape)}
    with torch.no_grad():
        try:
            got = functional_call(model.eval(), probe, (x,))
        except Exception:  # any model that cannot run this probe is not the simple linear one
            return None
        expected = x.reshape(3, -1) @ probe[weights[0]].T + probe[biases[0]]
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        return None
    return weights[0], biases[0]


# --------------------------------------------------------------------------------------------
# Optimizer on stacked rows


class RowOptimizer:
    """SGD (momentum, weight decay) or Adam applied row-wise to ``(N, P)`` parameters.

    State is reset by :meth:`reset` at the start of each round, like a real peer that builds a
    new optimizer for every local training call.
    """

    def __init__(self, config: TrainConfig, shape: tuple[int, int]) -> None:
        self.config = config
        self.shape = shape
        self._first: Tensor | None = None
        self._second: Tensor | None = None
        self._steps = torch.zeros(shape[0])

    def reset(self) -> None:
        """Forget momentum and Adam moments."""
        self._first = self._second = None
        self._steps.zero_()

    def step(self, params: Tensor, grad: Tensor, *, rows: Rows, lr: Tensor | float) -> None:
        """Update ``params`` in place; ``grad`` holds the ``rows`` (all rows when None)."""
        cfg = self.config
        current = self._take(params, rows)
        if cfg.weight_decay > 0:
            grad = grad.add(current, alpha=cfg.weight_decay)
        if cfg.optimizer == "adam":
            update = self._adam(grad, rows)
        elif cfg.momentum > 0:
            if self._first is None:
                self._first = torch.zeros(self.shape)
            buf = self._take(self._first, rows).mul_(cfg.momentum).add_(grad)
            self._put(self._first, rows, buf)
            update = buf
        else:
            update = grad
        if isinstance(lr, Tensor):
            update = update * lr.unsqueeze(1)
            lr = 1.0
        current.sub_(update, alpha=lr)
        self._put(params, rows, current)

    def _adam(self, grad: Tensor, rows: Rows) -> Tensor:
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        if self._first is None or self._second is None:
            self._first, self._second = torch.zeros(self.shape), torch.zeros(self.shape)
        first = self._take(self._first, rows).mul_(beta1).add_(grad, alpha=1 - beta1)
        second = self._take(self._second, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self._put(self._first, rows, first)
        self._put(self._second, rows, second)
        steps = self._take(self._steps, rows).add_(1)
        self._put(self._steps, rows, steps)
        correct1 = (1 - beta1**steps).unsqueeze(1)
        correct2 = (1 - beta2**steps).unsqueeze(1)
        return (first / correct1) / ((second / correct2).sqrt_().add_(eps))

    @staticmethod
    def _take(state: Tensor, rows: Rows) -> Tensor:
        """All rows and slices are views (updated in place); index tensors are copies."""
        if rows is None:
            return state
        return state[rows] if isinstance(rows, slice) else state.index_select(0, rows)

    @staticmethod
    def _put(state: Tensor, rows: Rows, value: Tensor) -> None:
        if isinstance(rows, Tensor):
            state.index_copy_(0, rows, value)


# --------------------------------------------------------------------------------------------
# The engine


@dataclass(frozen=True)
class Evaluation:
    """Every node scored on the same examples: mean loss ``(N,)``, confusion ``(N, C, C)``.

    ``predictions`` ``(N, E)`` is kept only when asked for.
    """

    loss: Tensor
    confusion: Tensor
    predictions: Tensor | None = None

    @property
    def accuracy(self) -> Tensor:
        """``(N,)`` fraction correct."""
        hits = self.confusion.diagonal(dim1=1, dim2=2).sum(dim=1)
        return hits.to(torch.float64) / self.confusion.sum(dim=(1, 2)).clamp_min(1)

    def weighted_accuracy(self, class_weights: Tensor) -> Tensor:
        """``(N,)`` accuracy on a test set reweighted to each node's label mix ``(N, C)``.

        ``sum_c w_ic * recall_ic``: how well node i does on data distributed like its own.
        """
        support = self.confusion.sum(dim=2).to(torch.float64)
        recall = self.confusion.diagonal(dim1=1, dim2=2).to(torch.float64) / support.clamp_min(1)
        weights = class_weights.to(torch.float64) * (support > 0)
        return (weights * recall).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12)


@dataclass
class Timings:
    """Seconds spent in each phase, summed over rounds."""

    train: float = 0.0
    trust: float = 0.0
    mix: float = 0.0
    evaluate: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """Plain numbers for JSON."""
        return {
            "train": self.train,
            "trust": self.trust,
            "mix": self.mix,
            "evaluate": self.evaluate,
        }


@contextmanager
def _timed(timings: Timings, phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        setattr(timings, phase, getattr(timings, phase) + time.perf_counter() - start)


class Engine:
    """N nodes in one process: ``run_round`` trains all of them, then mixes over the cohorts.

    Args:
        backend: the model as functions of stacked parameters (:func:`make_backend`).
        data: the data and each node's share of it.
        train: local training settings (one round = ``epochs`` passes or ``steps`` batches).
        mixing: the mixing rule and its settings.
        topology: who is in whose cohort each round.
        init: ``(P,)`` starting parameters, the same for every node (as a torrent's initial state).
        seed: fixes batch order, trust batches and dropout.
        share: what nodes send each other (default: their parameters).
        clusters: ``(N,)`` each node's true cluster (a clustered split), which the ``oracle``
            rule mixes within; None when there are none (``oracle`` then refuses to run).
        device: where the stacked parameters, data, optimizer state, mixing, trust and
            evaluation live. The batch-order and trust-batch generators stay on the CPU (the
            same draws on every device); node states and weights handed out are CPU tensors.
        dp: example-level DP, one :class:`~fedtorrent.privacy.dp_sgd.ExampleDP` per node: each
            round node i runs ``dp[i].steps`` DP-SGD steps on Poisson batches drawn from its
            ``TRAIN`` generator (as a real peer does), with noise from its ``DP_NOISE``
            generator. Needs the per-node loop (a ``ModuleLoopBackend``); the caller accounts.
        trust_dp: learned trust under example-level DP: each node's trust fit is DP-SGD on its
            logits (``mixing.round.PrivateTrust``: Poisson samples from its ``TRUST``
            generator, noise from the round's ``TRUST_NOISE`` generator); what each node
            released is ``releases`` after the round, for the caller to charge.
    """

    def __init__(
        self,
        *,
        backend: Backend,
        data: NodeData,
        train: TrainConfig,
        mixing: MixingConfig,
        topology: Topology,
        init: Tensor,
        seed: int,
        share: ShareFn | None = None,
        clusters: Tensor | None = None,
        device: torch.device | str = "cpu",
        dp: list[ExampleDP] | None = None,
        trust_dp: TrustDP | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type != "cpu":  # on the CPU nothing is copied or wrapped
            data = dataclasses.replace(
                data,
                **{
                    f.name: getattr(data, f.name).to(self.device)
                    for f in dataclasses.fields(data)
                    if isinstance(getattr(data, f.name), Tensor)
                },
            )
            init = init.to(self.device)
            _move_to(backend, self.device)
        n = data.num_nodes
        if topology.num_nodes != n:
            raise ConfigError(f"topology has {topology.num_nodes} nodes but data has {n}")
        if init.shape != (backend.num_params,):
            raise ConfigError(
                f"init has shape {tuple(init.shape)}, expected ({backend.num_params},)"
            )
        if (
            (mixing.rule == "fedfomo" or (mixing.rule == "learned" and mixing.trust_steps > 0))
            and bool((data.val_count == 0).any())
        ):  # fmt: skip
            raise ConfigError(
                f"mixing rule {mixing.rule!r} needs validation data on every node "
                "(val_fraction > 0)"
            )
        if clusters is not None and tuple(clusters.shape) != (n,):
            raise ConfigError(f"clusters has shape {tuple(clusters.shape)}, expected ({n},)")
        if mixing.rule == "oracle" and clusters is None:
            raise ConfigError("oracle mixing needs every node's true cluster (a clustered split)")
        if dp is not None and (
            len(dp) != n or not isinstance(backend, ModuleLoopBackend | LinearBackend)
        ):
            raise ConfigError(
                "example-level DP needs one ExampleDP per node, and the per-node loop or the "
                "linear path"
            )
        self.dp = dp
        self.trust_dp = trust_dp if mixing.rule == "learned" else None
        self.releases: tuple[tuple[Release, ...], ...] = tuple(() for _ in range(n))
        """Per node: what its private trust fit released in the last round (``trust_dp``)."""
        with self._on_device():  # the state allocated below lives on the device
            self.backend, self.data, self.train_config = backend, data, train
            self.mixing, self.topology, self.seed, self.share = mixing, topology, seed, share
            self.num_nodes = n
            self.same_cluster = (
                None
                if clusters is None
                else (clusters[:, None] == clusters[None, :]).to(self.device)
            )
            """``(N, N)`` bool: True where two nodes share a true cluster (None: no clusters)."""
            self.params = init.detach().to(torch.float32).unsqueeze(0).repeat(n, 1)
            self.before = self.params
            """Rows before the current round's training (kept only with a ``share`` hook or the
            ``fedfomo`` rule, whose reference they are)."""
            self.public = self.params
            """See :class:`ShareFn` (kept only with a ``share`` hook)."""
            self.rejected = 0
            """Shared rows receivers dropped as not finite, counted once per receiver, all
            rounds."""
            self.implausible = 0
            """Shared rows receivers dropped by the plausibility screen, once per receiver."""
            self.trust_excluded = 0
            """Cohort members learned trust excluded (non-finite mixed loss or gradient), per
            row."""
            self.unmixed = 0
            """Rows whose mix was not finite and which kept their own parameters instead."""
            self.trust_logits = torch.zeros(n, n)
            """``(N, N)`` learned trust logits, row i = node i's; a logit decays towards 0 in
            rounds its node is not in the row's cohort (``trust_decay``)."""
            self.trust_seen = torch.zeros(n, n, dtype=torch.bool) if topology.trust_guided else None
            """Trust-guided cohorts: True where node i mixed node j before (None otherwise)."""
            self.trust_kept = torch.zeros(n, dtype=torch.long)
            """Per node: rounds whose learned weights passed the held-out check
            (``trust_margin``)."""
            self.optimizer = RowOptimizer(train, (n, backend.num_params))
            self.timings = Timings()
            self._x_train = backend.prepare(data.x_train)
            self._x_test = backend.prepare(data.x_test)
            self._plain_sgd = (
                isinstance(backend, LinearBackend)
                and train.optimizer == "sgd"
                and train.momentum == 0
                and train.weight_decay == 0
                and train.lr_schedule == "constant"
            )
            self._y_shape = tuple(data.y_train.shape[1:])
            layout = backend.layout if isinstance(backend, ModuleLoopBackend) else None
            self.param_width = backend.num_params if layout is None else layout.num_params
            """Columns holding parameters (the first ones): what ``share`` hooks see."""
            self.mixed_width = backend.num_params if layout is None else layout.mixed_width
            """Columns that mixing combines; the rest (local buffers) each node keeps."""

    # ---- training -------------------------------------------------------------------------

    def train_round(self, round_index: int, *, lr_scale: float = 1.0) -> None:
        """Local training of every node at once: each node runs its own batches (no mixing).

        ``lr_scale`` multiplies ``train.lr`` for this round (a schedule across rounds).
        """
        if self.share is not None or self.mixing.rule == "fedfomo":
            self.before = self.params.clone()  # training updates ``params`` in place
        with _timed(self.timings, "train"), _forked_rng(self.seed, Stream.DROPOUT, round_index):
            generators = [
                node_generator(self.seed, Stream.TRAIN, round_index, node)
                for node in range(self.num_nodes)
            ]
            self._train(generators, self.train_config.lr * lr_scale, round_index)

    def _train(
        self, generators: list[torch.Generator], base_lr: float, round_index: int = 0
    ) -> None:
        backend = self.backend
        if self.dp is not None and isinstance(backend, LinearBackend):
            self._train_private_linear(generators, base_lr, round_index)
            return
        if not isinstance(backend, ModuleLoopBackend):
            self._plan(generators, base_lr, self._step)
            return
        # The same batches the stacked path would draw, then one node at a time.
        plan: list[list[Tensor]] = [[] for _ in range(self.num_nodes)]
        counts = self.data.train_count.tolist()
        if self.dp is not None:  # Poisson batches of the node's own rows, as a peer draws them
            for node, (count, dp) in enumerate(zip(counts, self.dp, strict=True)):
                rows = self.data.train_index[node, :count]
                drawn = poisson_batches(count, dp, generators[node]) if count else []
                plan[node] = [rows[positions.to(rows.device)] for positions in drawn]
            backend.train_nodes(
                self.params, plan, x=self._x_train, y=self.data.y_train,
                lr_scale=base_lr / self.train_config.lr, round_index=round_index,
                seed=self.seed, dp=self.dp, examples=counts,
            )  # fmt: skip
            return

        def collect(
            index: Tensor, weight: Tensor | None, *, rows: Tensor | None, **_: object
        ) -> None:
            nodes = range(int(index.shape[0])) if rows is None else rows.tolist()
            for position, node in enumerate(nodes):
                keep = index[position] if weight is None else index[position][weight[position] > 0]
                plan[node].append(keep)

        self._plan(generators, base_lr, collect)
        backend.train_nodes(
            self.params,
            plan,
            x=self._x_train,
            y=self.data.y_train,
            lr_scale=base_lr / self.train_config.lr,
            round_index=round_index,
            seed=self.seed,
        )

    def _train_private_linear(
        self, generators: list[torch.Generator], base_lr: float, round_index: int
    ) -> None:
        """Example-level DP on the linear path: every node's DP-SGD step at once.

        The same Poisson batches (from ``generators``) and noise (each node's ``DP_NOISE``
        generator of the round) as the per-node loop, so both paths give the same result up to
        float rounding; node i runs ``dp[i].steps`` steps, padded batches masked out.
        """
        assert self.dp is not None and isinstance(self.backend, LinearBackend)
        n, data = self.num_nodes, self.data
        counts = data.train_count.tolist()
        drawn = [
            poisson_batches(count, dp, generator) if count else []
            for count, dp, generator in zip(counts, self.dp, generators, strict=True)
        ]
        noise = [node_generator(self.seed, Stream.DP_NOISE, round_index, i) for i in range(n)]
        totals = torch.tensor([len(batches) for batches in drawn])
        self.optimizer.reset()
        for step in range(int(totals.max()) if n else 0):
            active = [i for i in range(n) if step < len(drawn[i])]
            width = max(1, *(len(drawn[i][step]) for i in active))
            index = torch.zeros(len(active), width, dtype=torch.int64)
            valid = torch.zeros(len(active), width, dtype=torch.bool)
            for row, node in enumerate(active):
                positions = drawn[node][step].to(self.device)
                index[row, : len(positions)] = data.train_index[node, positions]
                valid[row, : len(positions)] = True
            rows = None if len(active) == n else torch.tensor(active)
            flat = index.reshape(-1)
            x = self._x_train.index_select(0, flat).view(*index.shape, -1)
            y = data.y_train.index_select(0, flat).view(index.shape)
            grad = self.backend.private_grad(
                RowOptimizer._take(self.params, rows), x, y, valid,
                dp=[self.dp[i] for i in active],
                expected=[self.dp[i].expected_batch(counts[i]) for i in active],
                noise=[noise[i] for i in active],
            )  # fmt: skip
            lr: Tensor | float = base_lr
            if self.train_config.lr_schedule == "cosine":
                total = RowOptimizer._take(totals, rows)
                lr = base_lr * 0.5 * (1 + torch.cos(math.pi * step / total.clamp_min(1)))
            self.optimizer.step(self.params, grad, rows=rows, lr=lr)

    def _plan(
        self, generators: list[torch.Generator], base_lr: float, step_fn: Callable[..., None]
    ) -> None:
        """Draw every step's batches and hand each to ``step_fn`` (``_step``'s arguments).

        Node i's passes are ``randperm`` draws from ``generators[i]``, batch after batch, as
        :func:`fedtorrent.training.train_local` draws them in a real peer.
        """
        cfg, data = self.train_config, self.data
        batch = cfg.batch_size
        counts = data.train_count
        per_pass = (counts + batch - 1) // batch
        if cfg.steps is not None:
            totals = torch.where(counts > 0, cfg.steps, 0)
        else:
            totals = per_pass * cfg.epochs
        last = int(totals.max()) if self.num_nodes else 0
        if last == 0:
            return
        self.optimizer.reset()
        order = torch.zeros_like(data.train_index)
        # Every node has as many examples and steps: full batches need no masks and no row
        # subsets (a pass's short last batch takes the masked step below, the same numbers).
        uniform = len(set(counts.tolist())) == 1 and len(set(totals.tolist())) == 1
        everyone, per = torch.ones(self.num_nodes, dtype=torch.bool), int(per_pass[0])
        count = int(counts[0])
        slot = torch.arange(batch)
        for step in range(last):
            if uniform and (step % per + 1) * batch <= count:
                if step % per == 0:
                    self._shuffle_rows(order, everyone, generators)
                start = (step % per) * batch
                step_fn(order[:, start : start + batch], None, rows=None, step=step,
                        totals=totals, base_lr=base_lr)  # fmt: skip
                continue
            active = step < totals
            fresh = active & (step % per_pass.clamp_min(1) == 0)
            if bool(fresh.any()):
                self._shuffle_rows(order, fresh, generators)
            within = step % per_pass.clamp_min(1)
            rows = None if bool(active.all()) else active.nonzero().squeeze(1)
            position = within.unsqueeze(1) * batch + slot
            valid = position < counts.unsqueeze(1)
            index = order.gather(1, position.clamp_max(order.shape[1] - 1))
            weight: Tensor | None = valid / valid.sum(dim=1, keepdim=True).clamp_min(1)
            if rows is not None:
                index = index.index_select(0, rows)
                weight = None if weight is None else weight.index_select(0, rows)
            step_fn(index, weight, rows=rows, step=step, totals=totals, base_lr=base_lr)

    def _shuffle_rows(
        self, order: Tensor, rows_mask: Tensor, generators: list[torch.Generator]
    ) -> None:
        data = self.data
        for row in rows_mask.nonzero().squeeze(1).tolist():
            count = int(data.train_count[row])
            pick = torch.randperm(count, generator=generators[row]).to(self.device)
            order[row, :count] = data.train_index[row, pick]

    def _step(
        self,
        index: Tensor,
        weight: Tensor | None,
        *,
        rows: Tensor | None,
        step: int,
        totals: Tensor,
        base_lr: float,
    ) -> None:
        count, batch = index.shape
        chunk = max(1, _BATCH_FLOATS // (batch * math.prod(self._x_train.shape[1:])))
        for start in range(0, count, chunk):
            stop = min(count, start + chunk)
            part: Rows = rows
            if count > chunk:
                part = slice(start, stop) if rows is None else rows[start:stop]
            self._step_rows(
                index[start:stop],
                None if weight is None else weight[start:stop],
                rows=part,
                step=step,
                totals=totals,
                base_lr=base_lr,
            )

    def _step_rows(
        self,
        index: Tensor,
        weight: Tensor | None,
        *,
        rows: Rows,
        step: int,
        totals: Tensor,
        base_lr: float,
    ) -> None:
        count, batch = index.shape
        flat = index.reshape(-1)
        x = self._x_train.index_select(0, flat).view(count, batch, *self._x_train.shape[1:])
        y = self.data.y_train.index_select(0, flat).view(count, batch, *self._y_shape)
        if self._plain_sgd and not isinstance(rows, Tensor):
            assert isinstance(self.backend, LinearBackend)
            self.backend.sgd_step(RowOptimizer._take(self.params, rows), x, y, weight, lr=base_lr)
            return
        grad = self.backend.grad(RowOptimizer._take(self.params, rows), x, y, weight)
        lr: Tensor | float = base_lr
        if self.train_config.lr_schedule == "cosine":
            total = RowOptimizer._take(totals, rows)
            lr = base_lr * 0.5 * (1 + torch.cos(math.pi * step / total.clamp_min(1)))
        self.optimizer.step(self.params, grad, rows=rows, lr=lr)

    # ---- mixing ---------------------------------------------------------------------------

    def mix_round(self, round_index: int) -> Tensor | None:
        """Mix every node with its cohort; return the ``(N, N)`` weights used (None for robust).

        The round is :func:`fedtorrent.mixing.round.mix_round`, the code a real peer runs, with
        every node as a receiver: rows that are not finite, then rows the plausibility screen
        rejects, leave the receiver's cohort (counted in ``rejected`` and ``implausible``)
        before the rule mixes; a row whose mix is still not finite keeps its own parameters
        (``unmixed``). Local buffer columns stay each node's own. Trust-guided cohorts are
        chosen here from the trust logits so far (``Topology.cohorts``); after the mix the logits
        of nodes outside each row's cohort decay (``trust_decay``).
        """
        n, width, full = self.num_nodes, self.mixed_width, self.params.shape[1]
        eye = torch.eye(n, dtype=torch.bool)
        shared = self.params if self.share is None else self._shared_rows(round_index)
        own = self.params
        counters = self.backend.counters if isinstance(self.backend, ModuleLoopBackend) else {}
        adjacency = self.topology.cohorts(
            round_index, logits=self.trust_logits, seen=self.trust_seen
        )
        cohorts = Cohorts(
            shared=shared[:, :width],
            members=adjacency | eye,
            self_column=torch.arange(n),
            own=None if shared is own else own[:, :width],
            exact=counters,
            same_cluster=self.same_cluster,
            start=self.before[:, :width] if self.mixing.rule == "fedfomo" else None,
        )
        validated = self.mixing.rule in VALIDATED_RULES
        with _timed(self.timings, "trust" if validated else "mix"):
            trust = self._trust(round_index) if validated else None
            mixed = mix_round(cohorts, self.mixing, trust)
        if width < full:  # local buffers: each node's own
            self.params = torch.cat([mixed.params, own[:, width:]], dim=1)
        else:
            self.params = mixed.params
        if mixed.public is not None:
            public = mixed.public
            self.public = public if width == full else torch.cat([public, shared[:, width:]], 1)
        if isinstance(self.backend, ModuleLoopBackend):
            self.backend.counters = mixed.exact
        self.rejected += int(mixed.nonfinite.sum())
        self.implausible += int(mixed.implausible.sum())
        self.trust_excluded += int(mixed.excluded.sum())
        self.unmixed += int(mixed.unmixed.sum())
        if mixed.logits is not None:
            self.trust_logits = decay_logits(
                mixed.logits.detach(), cohorts.members, self.mixing.trust_decay
            )
        if self.trust_seen is not None:
            self.trust_seen |= adjacency
        if mixed.kept is not None:
            self.trust_kept += mixed.kept.long()
        self.releases = mixed.releases or tuple(() for _ in range(n))
        return mixed.weights

    def _shared_rows(self, round_index: int) -> Tensor:
        """What the ``share`` hook makes of the parameter columns; buffers travel as they are."""
        assert self.share is not None
        p = self.param_width
        if p == self.params.shape[1]:
            return self.share(self.params, round_index, before=self.before, public=self.public)
        part = self.share(
            self.params[:, :p],
            round_index,
            before=self.before[:, :p],
            public=self.public[:, :p],
        )
        return torch.cat([part, self.params[:, p:]], dim=1)

    def _trust(self, round_index: int) -> Trust:
        """Validation batches and loss (learned, fedfomo): node i draws from its ``TRUST`` seed.

        With ``trust_dp`` the fit is private (Poisson samples of the same generators).
        """
        data, backend, own = self.data, self.backend, self.params
        width = self.mixed_width
        generators = [
            node_generator(self.seed, Stream.TRUST, round_index, node)
            for node in range(self.num_nodes)
        ]
        counts = data.val_count.tolist()

        def take(pick: Tensor) -> tuple[Tensor, Tensor]:
            index = data.val_index.gather(1, pick.to(self.device))
            flat = index.reshape(-1)
            x = self._x_train.index_select(0, flat).view(*index.shape, *self._x_train.shape[1:])
            return x, data.y_train.index_select(0, flat).view(*index.shape, *self._y_shape)

        def draw() -> tuple[Tensor, Tensor]:
            return take(validation_rows(generators, counts, self.mixing.trust_batch_size))

        def complete(mixed: Tensor) -> Tensor:
            if width < own.shape[1]:  # local buffers: each node's own
                return torch.cat([mixed, own[:, width:]], dim=1)
            return mixed

        def losses(mixed: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return backend.losses(complete(mixed), x, y)

        private = None
        if self.trust_dp is not None:
            private = PrivateTrust(
                dp=self.trust_dp,
                generators=generators,
                counts=counts,
                take=take,
                noise=torch.Generator().manual_seed(
                    derive_seed(self.seed, Stream.TRUST_NOISE, round_index)
                ),
                example_losses=lambda mixed, x, y: backend.example_losses(complete(mixed), x, y),
            )
        return Trust(logits=self.trust_logits, draw=draw, losses=losses, private=private)

    # ---- rounds and evaluation -----------------------------------------------------------

    def run_round(self, round_index: int, *, lr_scale: float = 1.0) -> Tensor | None:
        """One round: local training, then mixing. Returns the mixing weights (see mix_round).

        The weights are a CPU tensor whatever the engine's device.
        """
        with self._on_device():
            self.train_round(round_index, lr_scale=lr_scale)
            weights = self.mix_round(round_index)
        return None if weights is None else weights.cpu()

    def _on_device(self) -> AbstractContextManager[Any]:
        """New tensors default to the engine's device inside; nothing at all on the CPU."""
        return nullcontext() if self.device.type == "cpu" else self.device

    def evaluate(
        self, x: Tensor | None = None, y: Tensor | None = None, *, keep_predictions: bool = False
    ) -> Evaluation:
        """Score every node on ``(x, y)`` (default: the test set), in chunks that bound memory."""
        with _timed(self.timings, "evaluate"), self._on_device():
            inputs = self._x_test if x is None else self.backend.prepare(x.to(self.device))
            targets = self.data.y_test if y is None else y.to(self.device)
            params, n = self.params, self.num_nodes
            # After fixed mixing on a complete graph every node holds the same model: score it once.
            same = n > 1 and bool((params == params[:1]).all())
            result = self._evaluate(
                inputs, targets, keep_predictions, params[:1] if same else params
            )
            if same:
                result = Evaluation(
                    loss=result.loss.expand(n).clone(),
                    confusion=result.confusion.expand(n, -1, -1).clone(),
                    predictions=None
                    if result.predictions is None
                    else result.predictions.expand(n, -1).clone(),
                )
        if self.device.type == "cpu":
            return result
        return Evaluation(
            loss=result.loss.cpu(),
            confusion=result.confusion.cpu(),
            predictions=None if result.predictions is None else result.predictions.cpu(),
        )

    def _evaluate(self, x: Tensor, y: Tensor, keep_predictions: bool, params: Tensor) -> Evaluation:
        n, classes, total = params.shape[0], self.data.num_classes, int(x.shape[0])
        loss = torch.zeros(n, dtype=torch.float64)
        confusion = torch.zeros(n * classes * classes, dtype=torch.int64)
        predictions = torch.zeros(n, total, dtype=torch.int64) if keep_predictions else None
        linear = isinstance(self.backend, LinearBackend)
        # Floats held per (row, example): logits for the linear path, activations otherwise.
        per_example = classes if linear else 32 * math.prod(x.shape[1:])
        rows_chunk = max(1, min(n, _EVAL_FLOATS // max(1, per_example * min(total, 1024))))
        ex_chunk = max(1, min(total, _EVAL_FLOATS // max(1, per_example * rows_chunk)))
        for r0 in range(0, n, rows_chunk):
            rows = slice(r0, min(n, r0 + rows_chunk))
            count = rows.stop - r0
            base = (torch.arange(r0, rows.stop) * classes * classes).unsqueeze(1)
            for e0 in range(0, total, ex_chunk):
                xs, ys = x[e0 : e0 + ex_chunk], y[e0 : e0 + ex_chunk]
                with torch.no_grad():
                    logits = self.backend.logits(params[rows], xs)
                    per_row = F.cross_entropy(
                        logits.transpose(1, 2), ys.expand(count, -1), reduction="none"
                    ).sum(dim=1)
                loss[rows] += per_row.to(torch.float64)
                guess = logits.argmax(dim=2)
                if predictions is not None:
                    predictions[rows, e0 : e0 + ex_chunk] = guess
                cells = base + ys.unsqueeze(0) * classes + guess
                confusion += torch.bincount(cells.reshape(-1), minlength=confusion.numel())
        return Evaluation(
            loss=loss / max(total, 1),
            confusion=confusion.view(n, classes, classes),
            predictions=predictions,
        )

    def node_state(self, node: int) -> dict[str, Tensor]:
        """Node ``node``'s state dict (a CPU copy), keyed and shaped like the model's."""
        if isinstance(self.backend, ModuleLoopBackend):
            state = self.backend.state_of(self.params[node], node)
        else:
            state = {
                k: v.clone() for k, v in flat_views(self.params[node], self.backend.like).items()
            }
        if self.device.type == "cpu":
            return state
        return {k: v.cpu() for k, v in state.items()}


def _move_to(backend: object, device: torch.device) -> None:
    """Move a backend's model, tensors and dicts of tensors to ``device`` (in place)."""
    for name, value in vars(backend).items():
        if isinstance(value, nn.Module):
            value.to(device)
        elif isinstance(value, Tensor):
            setattr(backend, name, value.to(device))
        elif (
            isinstance(value, dict) and value and all(isinstance(v, Tensor) for v in value.values())
        ):
            setattr(backend, name, {k: v.to(device) for k, v in value.items()})


@contextmanager
def _forked_rng(seed: int, *streams: int) -> Iterator[None]:
    """Seed torch's global generator (dropout in vmapped models) without leaking that to callers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *streams))
        yield
