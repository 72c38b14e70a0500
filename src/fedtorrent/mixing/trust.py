"""Learned trust: mixing weights ``W_i = softmax(a_i)`` fitted to a node's validation loss.

The formulas are pure functions that work on one peer's row ``(M,)`` or on every node's rows
``(N, M)`` at once; :class:`TrustLearner` keeps one real peer's logits by peer id between rounds.

Node i's trust logits ``a_i`` start at zero (uniform weights). Each round, after local training,
a few steps of plain gradient descent move ``a_i`` to lower node i's validation loss of the mixed
model ``sum_j W_ij theta_j``; the gradient flows through the mixture into ``a_i`` while every
``theta_j`` is held constant. Plain SGD (not Adam) on purpose: its steps shrink with the gradient,
so when the gradient is noise (iid data) the row stays near uniform and still reads as trust.

Numerical safety (whatever passes the plausibility screen): a row whose mixed loss or logit
gradient is not finite (or the gradient is beyond ``GRADIENT_LIMIT``) drops its most suspicious
member (the farthest from its own vector, from
``suspicion``) and is recomputed, until it is finite or only the node itself is left (then that
row's logits hold still). Dropped members are excluded for the round (weight exactly 0) and their
logit falls ``EXCLUDED_DROP`` below the lowest kept logit of the row. Logits are clamped to
``+-LOGIT_BOUND``, so an enormous but finite gradient cannot overflow them. So the weights are
always finite, non-negative and sum to 1 per row.

Under example-level DP (:class:`TrustDP`) the fit is DP-SGD on the logits: each step's gradient
is a sum of per-validation-example gradients clipped to ``clip``, plus Gaussian noise
(:func:`noisy_gradient`), over a Poisson sample of the node's validation examples; what it
releases is :func:`trust_releases` (Opacus history entries for the node's accountant).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F  # noqa: N812

from fedtorrent.config import MixingConfig, PrivacyConfig
from fedtorrent.errors import ConfigError, StateError
from fedtorrent.mixing.screen import pair_distances

Tensor = torch.Tensor
LossFn = Callable[[Tensor], Tensor]

_MASKED = -1e9
"""Logit of non-members: finite, so their weight is exactly 0 and their gradient 0, not NaN."""
LOGIT_BOUND = 1e4
"""Trust logits stay in ``[-LOGIT_BOUND, LOGIT_BOUND]`` (softmax is one-hot long before)."""
GRADIENT_LIMIT = 1e3
"""A row whose logit gradient is larger than this is treated like one that is not finite. The
gradient is a member's weight times the inner product of the loss gradient with its deviation
from the mix: on MNIST (6 nodes, 10 rounds) honest rows stayed below 0.14 (iid and Dirichlet
0.5), rows facing sign-flip, noise or scale attackers below 5; a state 1e10 times too large gives
1e20, and one step of that would fling every logit of the row to the bound."""
EXCLUDED_DROP = 10.0
"""An excluded member's logit falls this far below its row's lowest kept logit (weight ratio
``e^-10``, about 4.5e-5, when it next takes part)."""


def trust_weights(logits: Tensor, members: Tensor | None = None, *, floor: float = 0.0) -> Tensor:
    """Row-stochastic weights from trust logits: ``softmax`` over each row's members.

    Args:
        logits: ``(..., M)`` trust logits.
        members: ``(..., M)`` bool; None means every entry is a member. Non-members get weight 0
            and keep their logits untouched by :func:`learn_trust`.
        floor: lowest weight a member may get: ``W = f + (1 - M f) softmax``. ``f`` is capped at
            ``1 / M`` per row, where the weights are uniform.
    """
    if members is None:
        members = torch.ones_like(logits, dtype=torch.bool)
    weights = torch.softmax(torch.where(members, logits, _MASKED), dim=-1)
    if floor > 0:
        count = members.sum(dim=-1, keepdim=True).to(logits.dtype)
        low = torch.clamp(floor * torch.ones_like(count), max=1.0 / count)
        weights = low + (1.0 - count * low) * weights
    # ``where``, not a product: a non-member's gradient (it may be inf: its vector can be huge
    # though its weight is 0) is dropped here instead of turning the row's gradient into NaN.
    return torch.where(members, weights, 0.0)


def decay_logits(logits: Tensor, heard: Tensor, decay: float) -> Tensor:
    """Move the logits of peers not heard this round back towards the prior 0 by ``decay``.

    ``a <- (1 - decay) a`` where ``heard`` is False, unchanged where it is True (``heard`` marks
    the node itself too); 0 is where every logit starts, so a peer away long enough is met again
    as a newcomer: a distrusted one gets another chance, a trusted one must earn its trust again.
    ``decay = 0`` returns ``logits`` itself.
    """
    if decay <= 0:
        return logits
    return torch.where(heard, logits, logits * (1.0 - decay))


def negative_entropy(weights: Tensor) -> Tensor:
    """``sum_j W_j log W_j`` per row (0 for one-hot rows, ``-log M`` for uniform ones)."""
    return (weights * torch.log(weights.clamp_min(1e-30))).sum(dim=-1)


@dataclass(frozen=True)
class TrustDP:
    """DP-SGD settings of the trust fit: per validation example clipping and Gaussian noise.

    Every trust step clips each sampled validation example's gradient with respect to the
    receiver's logits to L2 norm ``clip``, sums them, adds ``N(0, (noise_multiplier * clip)^2)``
    to every member's entry and divides by the expected batch. Raises ConfigError unless both
    are finite and > 0.
    """

    clip: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        for name in ("clip", "noise_multiplier"):
            value = getattr(self, name)
            if not (_is_finite_number(value) and value > 0):
                raise ConfigError(f"trust DP {name} must be a finite number > 0, got {value!r}")


Release = tuple[float, float, int]
"""One Opacus history entry: ``(noise_multiplier, sample_rate, steps)``."""


def trust_sample_rate(count: int, batch_size: int) -> float:
    """Poisson rate ``q = min(1, batch_size / count)`` of a node's validation examples (0: none)."""
    return min(1.0, batch_size / count) if count > 0 else 0.0


def trust_releases(dp: TrustDP, *, count: int, batch_size: int, steps: int) -> tuple[Release, ...]:
    """What a private trust fit of ``steps`` steps releases about ``count`` validation examples.

    One entry ``(noise_multiplier, q, steps)``; none when there is nothing to fit on (no
    validation example or no step). Known before the round: a caller can project epsilon.
    """
    rate = trust_sample_rate(count, batch_size)
    if steps <= 0 or rate <= 0:
        return ()
    return ((float(dp.noise_multiplier), rate, int(steps)),)


def private_trust(privacy: PrivacyConfig | None, mixing: MixingConfig) -> TrustDP | None:
    """A session's private trust fit: ``TrustDP(trust_clip, trust_noise)`` of ``privacy``.

    Only under example-level DP with the ``learned`` rule; None otherwise (no DP, update-level
    DP, whose guarantee covers the node's whole data already, or a rule without a trust fit).
    """
    if privacy is None or not privacy.example_level or mixing.rule != "learned":
        return None
    return TrustDP(clip=privacy.trust_clip, noise_multiplier=privacy.trust_noise)


def planned_trust_releases(
    dp: TrustDP | None, mixing: MixingConfig, *, count: int
) -> tuple[Release, ...]:
    """What one round's private trust fit releases about a node's ``count`` validation examples.

    :func:`trust_releases` with the session's ``trust_batch_size`` and ``trust_steps``; none
    without ``dp``. The plan a node's accountant projects and derives a target epsilon with.
    """
    if dp is None:
        return ()
    return trust_releases(
        dp, count=count, batch_size=mixing.trust_batch_size, steps=mixing.trust_steps
    )


def clipped_sum(per_example: Tensor, mask: Tensor, clip: float) -> Tensor:
    """``(R, M)`` sum over the masked examples of ``(R, B, M)`` gradients clipped to ``clip``.

    Each example's row is scaled by ``min(1, clip / ||g||)``; a row that is not finite counts as
    0 (it is the example's contribution, still of norm <= ``clip``), so the sum is always finite.
    """
    finite = torch.isfinite(per_example).all(dim=-1, keepdim=True)
    grads = torch.where(finite, per_example, 0.0)
    norms = grads.norm(dim=-1, keepdim=True)
    scale = torch.clamp(clip / norms.clamp_min(1e-30), max=1.0)
    return (grads * scale * mask.unsqueeze(-1).to(grads.dtype)).sum(dim=-2)


def noisy_gradient(
    per_example: Tensor,
    mask: Tensor,
    *,
    dp: TrustDP,
    expected: Tensor,
    members: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """One DP-SGD gradient ``(R, M)`` of the mean validation loss, from per-example gradients.

    Args:
        per_example: ``(R, B, M)`` each sampled example's gradient of its loss with respect to
            its receiver's logits.
        mask: ``(R, B)`` bool, the examples receiver r actually sampled (the rest is padding).
        dp: clip and noise multiplier.
        expected: ``(R,)`` each receiver's expected batch ``q * n_val``; a receiver with 0 has no
            data: its gradient is 0 and no noise is drawn for it.
        members: ``(R, M)`` bool; noise goes to members only (a non-member's logit stays as it
            is, its gradient is exactly 0).
        generator: the noise source (a real peer seeds it secretly); draws ``(R, M)`` normals.

    Returns:
        ``(clipped_sum + N(0, (sigma C)^2)) / expected`` on members, 0 elsewhere.
    """
    total = clipped_sum(per_example, mask, dp.clip)
    noise = torch.randn(total.shape, generator=generator, device=generator.device)
    noise = noise.to(device=total.device, dtype=total.dtype) * (dp.noise_multiplier * dp.clip)
    has_data = (expected > 0).unsqueeze(-1)
    grad = (total + noise) / expected.clamp_min(1e-30).unsqueeze(-1).to(total.dtype)
    return torch.where(members & has_data, grad, 0.0)


@dataclass(frozen=True)
class TrustFit:
    """What :func:`learn_trust` returns: the new logits and who was kept.

    ``members`` are the input members minus ``excluded`` (members dropped this round because the
    row's loss or gradient was not finite with them); mix with
    ``trust_weights(logits, members)``, never with the input members.
    """

    logits: Tensor
    members: Tensor
    excluded: Tensor


def learn_trust(
    logits: Tensor,
    *,
    mixed_loss: Callable[[Tensor], Tensor] | None = None,
    private_gradient: Callable[[Tensor, Tensor], Tensor] | None = None,
    members: Tensor | None = None,
    lr: float,
    steps: int,
    floor: float = 0.0,
    entropy_penalty: float = 0.0,
    suspicion: Tensor | None = None,
    on_step: Callable[[], None] | None = None,
) -> TrustFit:
    """Run ``steps`` steps of plain gradient descent on the trust logits.

    Args:
        logits: ``(..., M)``; not modified.
        mixed_loss: maps weights ``(..., M)`` to one validation loss per row ``(...,)`` of the
            model mixed with those weights, e.g. ``lambda w: loss_fn(mix(w, stack))``. It may
            draw a fresh validation batch on each call. Rows must not depend on each other.
        private_gradient: instead of ``mixed_loss``, under :class:`TrustDP`: maps the current
            logits and members to each row's noisy gradient of its validation loss (e.g.
            :func:`noisy_gradient`); called exactly once per step (each call is a release).
            Rows are then never recomputed and nobody is excluded (that would read the loss
            again): a row whose noisy gradient is not finite or beyond ``GRADIENT_LIMIT``
            holds still that step.
        members: which entries of each row are in the cohort plus self (None: all).
        lr: step size on the logits; it must be much larger than a model's (1 to 10).
        steps: how many steps; 0 returns a copy of ``logits``.
        floor: see :func:`trust_weights`.
        entropy_penalty: adds ``entropy_penalty * sum_j W_j log W_j`` to each row's loss, which
            pulls the row towards uniform.
        suspicion: ``(..., M)`` the order in which a row whose loss or gradient is not finite
            (or the gradient beyond ``GRADIENT_LIMIT``) drops members, largest first (e.g. the
            distance from the row's own vector); ``-inf`` marks entries never dropped (the row's
            own). None: such a row only holds still.
        on_step: called at the start of every step (e.g. to draw that step's validation batch,
            which ``mixed_loss`` then uses for the step and any recomputation within it).

    Returns:
        The new logits (excluded members' fallen, see the module docstring), the members kept
        and the members excluded.
    """
    if (mixed_loss is None) == (private_gradient is None):
        raise ConfigError("learn_trust takes exactly one of mixed_loss and private_gradient")
    current = logits.detach().clone()
    kept = torch.ones_like(current, dtype=torch.bool) if members is None else members.clone()
    excluded = torch.zeros_like(kept)
    for _ in range(steps):
        if on_step is not None:
            on_step()
        if private_gradient is not None:
            grad = private_gradient(current, kept)
            if entropy_penalty > 0:  # data-independent: added after the noise, not clipped
                leaf = current.requires_grad_(True)
                weights = trust_weights(leaf, kept, floor=floor)
                penalty = entropy_penalty * negative_entropy(weights).sum()
                grad = grad + torch.autograd.grad(penalty, leaf)[0]
                current = current.detach()
            held = ~(grad.abs().amax(dim=-1) <= GRADIENT_LIMIT)
            grad = torch.where(held.unsqueeze(-1), 0.0, grad)
            current = torch.clamp(current - lr * grad, -LOGIT_BOUND, LOGIT_BOUND)
            continue
        assert mixed_loss is not None
        while True:
            leaf = current.requires_grad_(True)
            weights = trust_weights(leaf, kept, floor=floor)
            losses = mixed_loss(weights)
            objective = losses.sum()
            if entropy_penalty > 0:
                objective = objective + entropy_penalty * negative_entropy(weights).sum()
            (grad,) = torch.autograd.grad(objective, leaf)
            current = current.detach()
            bad = ~torch.isfinite(losses) | ~(grad.abs().amax(dim=-1) <= GRADIENT_LIMIT)
            if not bool(bad.any()):
                break
            drop = _most_suspicious(kept, bad, suspicion)
            if not bool(drop.any()):
                grad = torch.where(bad.unsqueeze(-1), 0.0, grad)  # nothing left to drop
                break
            kept, excluded = kept & ~drop, excluded | drop
        current = torch.clamp(current - lr * grad, -LOGIT_BOUND, LOGIT_BOUND)
    if bool(excluded.any()):
        lowest = torch.where(kept, current, torch.inf).amin(dim=-1, keepdim=True)
        fallen = torch.clamp(lowest - EXCLUDED_DROP, min=-LOGIT_BOUND)
        current = torch.where(excluded, torch.minimum(current, fallen), current)
    return TrustFit(logits=current, members=kept, excluded=excluded)


def _most_suspicious(kept: Tensor, bad: Tensor, suspicion: Tensor | None) -> Tensor:
    """One member per bad row to drop: its kept member of highest suspicion (never ``-inf``)."""
    if suspicion is None:
        return torch.zeros_like(kept)
    score = torch.nan_to_num(
        suspicion.to(torch.float64), nan=torch.inf, posinf=torch.inf, neginf=-torch.inf
    )
    candidates = kept & bad.unsqueeze(-1) & (score > -torch.inf)
    score = torch.where(candidates, score, -torch.inf)
    pick = torch.zeros_like(kept).scatter_(-1, score.argmax(dim=-1, keepdim=True), True)
    return pick & candidates


def prefer_learned(loss_learned: Tensor, loss_uniform: Tensor, *, margin: float) -> Tensor:
    """Bool mask: rows whose learned weights beat uniform ones on a held-out batch.

    Learned trust is used only where its validation loss is lower than uniform mixing's by the
    relative ``margin`` (``loss_learned < (1 - margin) * loss_uniform``), both scored on the same
    fresh batch. So trust departs from uniform only on held-out evidence: in iid swarms, where
    uniform is optimal by symmetry, it ties ``fixed``; against attackers or under label skew,
    where the evidence is large, it acts as before. ``margin <= 0`` disables the check (always
    learned). With the check on, a non-finite learned loss never wins, a non-finite uniform
    one always loses.
    """
    finite = torch.isfinite(loss_learned)
    if margin <= 0:
        return torch.ones_like(finite)
    beats = loss_learned < (1.0 - margin) * loss_uniform
    return finite & (beats | ~torch.isfinite(loss_uniform))


def flat_views(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split ``(..., P)`` into tensors shaped like ``like`` (sorted keys, as ``state.flatten``).

    Unlike ``state.unflatten`` this keeps leading batch axes, does not copy where dtypes agree,
    and stays differentiable, so a model can be called on a flat parameter vector.
    """
    keys = sorted(like)
    sizes = [like[k].numel() for k in keys]
    if vector.shape[-1] != sum(sizes):
        raise StateError(f"vector of length {vector.shape[-1]} does not hold {sum(sizes)} values")
    lead = vector.shape[:-1]
    out: dict[str, Tensor] = {}
    for key, chunk in zip(keys, torch.split(vector, sizes, dim=-1), strict=True):
        out[key] = chunk.reshape(*lead, *like[key].shape).to(like[key].dtype)
    return out


def model_loss_fn(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    keys: Collection[str] | None = None,
) -> LossFn:
    """Mean ``loss`` of ``model`` on one batch, as a function of its flat state vector.

    ``loss`` is ``(output, target) -> scalar`` (default cross-entropy). The vector follows
    ``state.flatten`` of the model's state restricted to ``keys`` (default every key); the keys
    left out keep the model's current values. Buffers (BatchNorm running statistics) take their
    values from the vector but pass no gradient. The model's current mode is used; call
    ``model.eval()`` first to turn dropout off.
    """
    forward = _flat_forward(model, inputs, keys)
    criterion = F.cross_entropy if loss is None else loss

    def fn(flat: Tensor) -> Tensor:
        return criterion(forward(flat), targets)

    return fn


def model_example_loss_fn(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    keys: Collection[str] | None = None,
) -> LossFn:
    """Like :func:`model_loss_fn`, but ``(B,)``: each example's loss (for :class:`TrustDP`).

    One forward pass of the batch; a task's ``loss`` is applied to each example alone (a batch
    of one, under ``vmap``), so the mean of these is the task's loss wherever that is a mean.
    Differentiable in forward mode too (``torch.func.jvp``).
    """
    forward = _flat_forward(model, inputs, keys)

    def fn(flat: Tensor) -> Tensor:
        return example_loss(loss, forward(flat), targets)

    return fn


def example_loss(
    loss: Callable[[Tensor, Tensor], Tensor] | None, output: Tensor, target: Tensor
) -> Tensor:
    """``(E,)`` each example's loss of a batch's ``output`` ``(E, ...)`` against ``target``.

    ``loss`` is a task's mean loss ``(output, target) -> scalar``, applied to each example alone
    (a batch of one, under ``vmap``); None is cross-entropy. Differentiable in forward mode too.
    """
    if loss is None:
        return F.cross_entropy(output, target, reduction="none")
    per: Tensor = vmap(lambda o, t: loss(o.unsqueeze(0), t.unsqueeze(0)))(output, target)
    return per


def _flat_forward(
    model: nn.Module, inputs: Tensor, keys: Collection[str] | None
) -> Callable[[Tensor], Tensor]:
    """``model(inputs)`` as a function of the flat vector of its state (``keys``; see above)."""
    like = {k: v.detach() for k, v in model.state_dict().items() if keys is None or k in keys}
    buffers = {name for name, _ in model.named_buffers()} & set(like)

    def forward(flat: Tensor) -> Tensor:
        views = flat_views(flat, like)
        for key in buffers:  # running statistics enter as data; BatchNorm has no grad for them
            views[key] = views[key].detach()
        out: Tensor = functional_call(model, views, (inputs,))
        return out

    return forward


class TrustLearner:
    """One peer's trust logits, keyed by peer id, learned round after round.

    A peer's logit persists across rounds in which it is not in the cohort (decaying towards 0
    with ``trust_decay``, :func:`decay_logits`); a newcomer starts at 0, the same as everyone did
    at the start. Rows are always ordered ``[self, *cohort]``.
    """

    def __init__(self, config: MixingConfig) -> None:
        self.config = config
        self._self_logit = 0.0
        self._peer_logits: dict[str, float] = {}
        self.last_check: bool | None = None
        """Whether the last :meth:`learn` passed the held-out check (None: no check ran)."""
        self.last_excluded: list[str] = []
        """Cohort members the last :meth:`learn` excluded (non-finite loss or gradient)."""

    def logits(self, cohort: Sequence[str]) -> Tensor:
        """``(1 + k,)`` logits for ``[self, *cohort]``."""
        if len(set(cohort)) != len(cohort):
            raise ConfigError(f"cohort lists a peer twice: {list(cohort)}")
        values = [self._self_logit, *(self._peer_logits.get(p, 0.0) for p in cohort)]
        return torch.tensor(values, dtype=torch.float32)

    def known(self) -> dict[str, float]:
        """The logit of every peer heard before (a trust-guided cohort's "seen" candidates)."""
        return dict(self._peer_logits)

    def weights(self, cohort: Sequence[str]) -> Tensor:
        """Current mixing weights ``(1 + k,)`` over ``[self, *cohort]``."""
        return trust_weights(self.logits(cohort), floor=self.config.weight_floor)

    def remember(
        self, cohort: Sequence[str], logits: Tensor, *, excluded: Sequence[str], check: bool | None
    ) -> None:
        """Keep the logits a round fitted for ``[self, *cohort]`` (``mixing.round``).

        Every other known peer was not heard this round: its logit decays (``trust_decay``).
        """
        values = logits.detach().cpu().tolist()
        if len(values) != len(cohort) + 1:
            raise ConfigError(f"{len(values)} logits do not cover self plus {len(cohort)} peers")
        heard = set(cohort)
        away = [p for p in self._peer_logits if p not in heard]
        if away and self.config.trust_decay > 0:
            old = torch.tensor([self._peer_logits[p] for p in away], dtype=torch.float64)
            unheard = torch.zeros_like(old, dtype=torch.bool)
            new = decay_logits(old, unheard, self.config.trust_decay)
            self._peer_logits.update(zip(away, new.tolist(), strict=True))
        self._self_logit = float(values[0])
        self._peer_logits.update(zip(cohort, (float(v) for v in values[1:]), strict=True))
        self.last_excluded = list(excluded)
        self.last_check = check

    def learn(
        self,
        cohort: Sequence[str],
        stack: Tensor,
        loss_fn: LossFn,
        *,
        check_loss_fn: LossFn | None = None,
    ) -> Tensor:
        """Fit the logits of ``[self, *cohort]`` to ``loss_fn`` and return this round's weights.

        The fit and the check are :func:`fedtorrent.mixing.round.fit_trust`, the code a peer's
        round and the simulator run; this is the same step for a caller holding loss functions
        of one flat vector instead of validation batches (no screen: every row is a member).

        Args:
            cohort: peer ids of rows ``1..k`` of ``stack``.
            stack: ``(1 + k, P)`` flat parameters, own vector first.
            loss_fn: validation loss of one flat vector, e.g. :func:`model_loss_fn`.
            check_loss_fn: loss on a fresh validation batch (the same batch on every call). With
                it and ``trust_margin > 0``, the learned weights are returned only when they beat
                uniform ones by the margin (:func:`prefer_learned`), else uniform weights are;
                the logits keep what they learned either way.

        Returns:
            ``(1 + k,)`` weights; members excluded this round (``last_excluded``) get exactly 0.
        """
        # mixing.round builds on this module, so it is imported when first used.
        from fedtorrent.mixing.round import Cohorts, Trust, fit_trust  # noqa: PLC0415

        if stack.ndim != 2 or stack.shape[0] != len(cohort) + 1:
            raise ConfigError(
                f"stack of shape {tuple(stack.shape)} does not hold self plus {len(cohort)} peers"
            )
        frozen = stack.detach()
        k = len(cohort)
        cfg = self.config
        if check_loss_fn is None or not cohort:
            cfg = dataclasses.replace(cfg, trust_margin=0.0)
        steps = [0]

        def draw() -> tuple[Tensor, Tensor]:  # which loss: a trust step, or the check after
            steps[0] += 1
            return torch.tensor(steps[0] > cfg.trust_steps), torch.zeros(())

        def losses(mixed: Tensor, checking: Tensor, _: Tensor) -> Tensor:
            fn = check_loss_fn if bool(checking) and check_loss_fn is not None else loss_fn
            return fn(mixed[0]).reshape(1)

        distances = pair_distances(
            frozen[:1], frozen, torch.zeros(k, dtype=torch.long), torch.arange(1, k + 1)
        )
        suspicion = torch.cat([torch.full((1,), -torch.inf, dtype=torch.float64), distances])
        members = torch.ones(1, k + 1, dtype=torch.bool)
        cohorts = Cohorts(shared=frozen, members=members, self_column=torch.zeros(1).long())
        weights, logits, _, excluded, kept = fit_trust(
            Trust(logits=self.logits(cohort).unsqueeze(0), draw=draw, losses=losses),
            members,
            cohorts,
            frozen,
            cfg,
            suspicion=suspicion.unsqueeze(0),
        )
        dropped = excluded[0, 1:].tolist()
        self.remember(
            cohort,
            logits[0],
            excluded=[p for p, out in zip(cohort, dropped, strict=True) if out],
            check=None if kept is None else bool(kept[0]),
        )
        return weights[0]

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready logits: ``{"self": float, "peers": {peer_id: float}}``."""
        return {"self": self._self_logit, "peers": dict(self._peer_logits)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore logits saved by :meth:`state_dict`; raises StateError on anything malformed."""
        own, peers = state.get("self"), state.get("peers")
        if not _is_finite_number(own) or not isinstance(peers, Mapping):
            raise StateError("trust state needs a finite 'self' logit and a 'peers' mapping")
        for peer, value in peers.items():
            if not isinstance(peer, str) or not _is_finite_number(value):
                raise StateError(f"trust state holds a bad entry for peer {peer!r}")
        self._self_logit = float(own)  # type: ignore[arg-type]
        self._peer_logits = {str(p): float(v) for p, v in peers.items()}


def _is_finite_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))  # type: ignore[arg-type]
    )
