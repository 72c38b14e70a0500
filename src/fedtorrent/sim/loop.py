"""The per-node path of the engine: one real ``nn.Module``, loaded with each node's state in turn.

Any model, loss, optimizer and training step runs here, buffers included (BatchNorm's running
statistics move as they do in a real peer). A node's state is split by its
:func:`~fedtorrent.state.schema.state_schema`:

- its **row** of the engine's ``(N, W)`` float32 tensor holds, in this order, the parameters
  (``num_params`` columns: what privacy and attacks see), the floating buffers shared by mixing
  (``share == "mix"``) and the floating buffers each node keeps (``share == "local"``, from
  ``mixed_width`` on). Mixing, trust and the screen work on rows as they do for any model; the
  engine puts the local columns back after every mix;
- its **counters** (integer and bool buffers such as ``num_batches_tracked``) stay in their own
  dtype, one ``(N, ...)`` tensor per key, never in the float rows: shared ones (``exact``) are
  combined as the weighted mean rounded to the nearest integer in float64, local ones are kept.

Optimizers see ``model.parameters()`` only, so weight decay never touches a buffer; privacy noise
is added to the parameter columns only (see ``Engine.mix_round``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F  # noqa: N812

from fedtorrent.errors import ConfigError, StateError
from fedtorrent.mixing.trust import example_loss
from fedtorrent.privacy.dp_sgd import ExampleDP
from fedtorrent.state.schema import state_schema
from fedtorrent.training.seeds import Stream, node_generator

LossFn = Callable[[Tensor, Tensor], Tensor]
OptimizerFn = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
StepFn = Callable[[nn.Module, tuple[Tensor, Tensor], object], Tensor]


def has_buffers(model: nn.Module) -> bool:
    """True when ``model.state_dict()`` holds anything besides its parameters."""
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return any(key not in names for key in model.state_dict())


class StateLayout:
    """How one node's state dict maps to a float row plus integer counters (see the module doc).

    Attributes:
        columns: the keys held in the row, in row order.
        like: those keys' tensors (shapes and dtypes to restore).
        num_params: columns taken by parameters (the first ones).
        mixed_width: columns that mixing combines (parameters and mixed buffers).
        width: all columns (local floating buffers last).
        exact: integer buffers combined exactly across nodes.
        counters: every integer buffer (``exact`` and local ones), kept apart from the row.
    """

    def __init__(self, model: nn.Module, *, buffers: str = "average") -> None:
        entries = state_schema(model, buffers=buffers)["tensors"]
        state = model.state_dict()
        floating = {k for k, v in state.items() if v.is_floating_point()}
        for key, value in state.items():
            if value.is_complex():
                raise ConfigError(f"state tensor {key!r} is complex; the simulator holds reals")

        def keys(kind: str, share: str, is_float: bool) -> list[str]:
            return sorted(
                k
                for k, e in entries.items()
                if e["kind"] == kind and e["share"] == share and (k in floating) == is_float
            )

        params = sorted(k for k, e in entries.items() if e["kind"] == "parameter")
        if any(k not in floating for k in params):
            raise ConfigError("every parameter must be a floating tensor")
        mixed = keys("buffer", "mix", True)
        local = keys("buffer", "local", True)
        self.columns = [*params, *mixed, *local]
        self.like = {k: state[k].detach().clone() for k in self.columns}
        self.num_params = sum(state[k].numel() for k in params)
        self.mixed_width = self.num_params + sum(state[k].numel() for k in mixed)
        self.width = self.mixed_width + sum(state[k].numel() for k in local)
        self.exact = keys("buffer", "exact", False)
        self.counters = sorted([*self.exact, *keys("buffer", "local", False)])
        self.counter_like = {k: state[k].detach().clone() for k in self.counters}

    def flatten(self, state: Mapping[str, Tensor]) -> Tensor:
        """The ``(W,)`` float32 row of ``state`` (its counters are left out)."""
        return torch.cat([state[k].detach().reshape(-1).to(torch.float32) for k in self.columns])

    def views(self, row: Tensor) -> dict[str, Tensor]:
        """``row`` (or ``(..., W)`` rows) split into the layout's tensors; differentiable."""
        if row.shape[-1] != self.width:
            raise StateError(f"row of length {row.shape[-1]} does not hold {self.width} values")
        sizes = [self.like[k].numel() for k in self.columns]
        lead = row.shape[:-1]
        return {
            key: chunk.reshape(*lead, *self.like[key].shape).to(self.like[key].dtype)
            for key, chunk in zip(self.columns, torch.split(row, sizes, dim=-1), strict=True)
        }


class ModuleLoopBackend:
    """The engine's backend for any model: a loop over nodes with one real module.

    Args:
        model: the task's model (its weights are overwritten node by node).
        layout: how a node's state is held (:class:`StateLayout` of ``model``).
        num_nodes: N, for the per-node counters.
        make_optimizer: ``(parameters) -> Optimizer``, called once per node and round (a real
            peer also starts each round with a fresh optimizer).
        loss: ``(output, target) -> scalar``, the mean loss of a batch; None is cross-entropy.
        step: ``(model, batch, ctx) -> loss`` one whole optimizer step
            (:func:`fedtorrent.task.default_train_step` when None).
        lr_schedule: ``constant`` or ``cosine`` (decay to 0 over a node's steps in a round).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layout: StateLayout,
        num_nodes: int,
        make_optimizer: OptimizerFn,
        loss: LossFn | None = None,
        step: StepFn | None = None,
        lr_schedule: str = "constant",
    ) -> None:
        from fedtorrent.task.contract import default_train_step  # noqa: PLC0415

        self.model, self.layout = model, layout
        self.like = layout.like
        self.num_params = layout.width
        self.loss: LossFn = loss if loss is not None else F.cross_entropy
        self.step: StepFn = step if step is not None else default_train_step  # type: ignore[assignment]
        self.make_optimizer, self.lr_schedule = make_optimizer, lr_schedule
        self._parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        self.counters = {
            key: value.unsqueeze(0).repeat(num_nodes, *([1] * value.ndim))
            for key, value in layout.counter_like.items()
        }

    def prepare(self, x: Tensor) -> Tensor:
        """Inputs as they are."""
        return x

    def state_of(self, row: Tensor, node: int) -> dict[str, Tensor]:
        """Node ``node``'s full state dict (copies) from its row and its counters."""
        state = {k: v.detach().clone() for k, v in self.layout.views(row).items()}
        state.update({k: v[node].clone() for k, v in self.counters.items()})
        return state

    def train_nodes(
        self,
        params: Tensor,
        plan: Sequence[Sequence[Tensor]],
        *,
        x: Tensor,
        y: Tensor,
        lr_scale: float,
        round_index: int,
        seed: int,
        dp: Sequence[ExampleDP] | None = None,
        examples: Sequence[int] = (),
    ) -> None:
        """Train node i on the batches ``plan[i]`` (index tensors into ``x``, ``y``); in place.

        The loop is :func:`fedtorrent.task.drive.run_steps`, a peer's: each node's optimizer
        rates are its initial ones times ``lr_scale`` (and the cosine factor of
        ``lr_schedule``); the step's ``ctx.generator`` is the node's ``Stream.STEP`` generator of
        the round. With ``dp`` (one :class:`ExampleDP` per node, ``examples[i]`` node i's
        training set size) every step is DP-SGD's
        (:func:`fedtorrent.task.drive.private_step_fn`) with noise from the node's
        ``Stream.DP_NOISE`` generator of the round, in place of the backend's own step.
        """
        from fedtorrent.task.contract import TrainContext  # noqa: PLC0415
        from fedtorrent.task.drive import private_step_fn, run_steps  # noqa: PLC0415

        model = self.model
        for node, batches in enumerate(plan):
            if not batches:
                continue
            step = self.step
            if dp is not None:
                noise = node_generator(seed, Stream.DP_NOISE, round_index, node)
                step = private_step_fn(None, model, dp[node], examples=examples[node], noise=noise)  # type: ignore[assignment]
            model.load_state_dict(self.state_of(params[node], node))
            ctx = TrainContext(
                device=x.device,
                round=round_index,
                generator=node_generator(seed, Stream.STEP, round_index, node),
                loss=self.loss,
                optimizer=self.make_optimizer(model.parameters()),
            )
            run_steps(step, model, x, y, batches, ctx=ctx, lr_scale=lr_scale,
                      cosine=self.lr_schedule == "cosine")  # fmt: skip
            state = model.state_dict()
            params[node] = self.layout.flatten(state)
            for key, value in self.counters.items():
                value[node] = state[key]

    def _forward(self, row: Tensor, x: Tensor) -> Tensor:
        # Buffers enter detached: BatchNorm's kernel refuses a gradient through running stats, so
        # the trust gradient flows through the parameters of the mix (buffers still mix with it).
        state = {
            key: value if key in self._parameters else value.detach()
            for key, value in self.layout.views(row).items()
        }
        out: Tensor = functional_call(self.model, state, (x,))
        return out

    def losses(self, params: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``(A,)`` mean loss of each row on its own batch, in eval mode; differentiable."""
        self.model.eval()
        return torch.stack([self.loss(self._forward(params[i], x[i]), y[i]) for i in range(len(x))])

    def example_losses(self, params: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``(A, B)`` each example's loss (a batch of one of the task's loss), in eval mode."""
        self.model.eval()
        loss = None if self.loss is F.cross_entropy else self.loss
        return torch.stack(
            [example_loss(loss, self._forward(params[i], x[i]), y[i]) for i in range(len(x))]
        )

    def logits(self, params: Tensor, x: Tensor) -> Tensor:
        """``(A, E, ...)`` eval-mode outputs of every row on the same inputs; no gradients."""
        self.model.eval()
        with torch.no_grad():
            return torch.stack([self._forward(row, x) for row in params])

    def grad(self, params: Tensor, x: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
        """Not used: this backend trains through :meth:`train_nodes`."""
        raise NotImplementedError("ModuleLoopBackend trains node by node (train_nodes)")
