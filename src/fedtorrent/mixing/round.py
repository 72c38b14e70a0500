"""One mixing round, the single implementation the simulator's engine and a real peer both call.

A round mixes for ``R`` receivers what ``M`` senders shared (:class:`Cohorts`). The engine passes
every node at once (``R = M = N``, node i's own column is i); a real peer passes itself alone
(``R = 1``) over ``[self, *heard]`` (``M = 1 + k``, its own column 0). :func:`mix_round` runs the
same steps, in the same order, for both:

1. received rows that are not finite leave every other receiver's cohort (``nonfinite``);
2. the plausibility screen (:mod:`fedtorrent.mixing.screen`) drops implausible rows
   (``implausible``), measured from each receiver's own true vector;
3. the rule: ``none`` keeps the own vector; ``fixed``, ``metropolis``, ``learned``,
   ``fedfomo`` and the simulator's ``oracle`` (uniform over the members in the receiver's true
   cluster) are weights (learned trust is fitted here, :func:`fit_trust`, on validation batches
   the caller draws from :func:`validation_rows`, then passes the held-out check; FedFomo's
   weights, :func:`fit_fomo`, come from one such batch); robust rules reduce each receiver's
   ``[own, *cohort]`` stack;
4. privacy's public correction: a receiver mixes its own *true* vector although its cohort saw
   its shared one (``own``); what the cohort can compute of its mix is ``public``;
5. the guard: a receiver whose mix is not finite keeps its own vector (``unmixed``);
6. exact keys (integer buffers) are combined in float64 with the same weights and rounded
   (:func:`mix_exact`); local keys never enter.

Seeds come from :func:`fedtorrent.training.seeds.node_generator` (stream ``TRUST``), one
generator per receiver and round, so the engine and a peer draw the same validation batches.

Under example-level DP a :class:`PrivateTrust` in the :class:`Trust` makes the fit DP-SGD on the
logits (Poisson-sampled validation examples, :func:`poisson_rows`; per-example logit gradients,
:func:`example_gradients`; clipping and noise, :func:`fedtorrent.mixing.trust.noisy_gradient`);
``Mixed.releases`` says what each receiver released, for its accountant. The rules that read the
validation data outside that mechanism are refused (:func:`check_private_mixing`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.func import jvp, vmap

from fedtorrent.config import MixingConfig, check_private_mixing
from fedtorrent.errors import ConfigError
from fedtorrent.mixing.fomo import fomo_weights
from fedtorrent.mixing.rules import (
    WEIGHTED_RULES,
    coordinate_median,
    krum,
    metropolis_rows,
    mix,
    trimmed_mean,
    uniform_weights,
)
from fedtorrent.mixing.screen import (
    finite_or_own,
    finite_rows,
    implausible_pairs,
    pair_distances,
    square_norms,
)
from fedtorrent.mixing.trust import (
    Release,
    TrustDP,
    learn_trust,
    noisy_gradient,
    prefer_learned,
    trust_releases,
    trust_sample_rate,
    trust_weights,
)

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor]
"""One validation batch per receiver: inputs ``(R, B, ...)`` and targets ``(R, B, ...)``."""

VALIDATED_RULES = ("learned", "fedfomo")
"""Rules that score received vectors on the receiver's validation batches (they take a
:class:`Trust`)."""

_FORWARD_AD = threading.Lock()
"""torch's forward-mode AD levels are process-wide: peers hosted on threads of one process
(``node.host``) take turns at ``jvp`` (two at once fail: "no level exists")."""
GATHER_BUDGET = 64 * 2**20
"""Floats a gathered ``(G, size, P)`` cohort stack for the robust rules may take at once."""


@dataclass(frozen=True)
class Cohorts:
    """What ``R`` receivers got from ``M`` senders this round.

    Attributes:
        shared: ``(M, P)`` the float vectors the senders shared (each receiver's own shared row
            included, at its ``self_column``).
        members: ``(R, M)`` bool: True where a receiver mixes a sender, its own column included.
        self_column: ``(R,)`` int64: each receiver's own column of ``shared``.
        own: ``(R, P)`` each receiver's true vector, when it differs from what it shared
            (privacy noise, an attack, a share hook); None: the shared rows are the true ones.
        exact: integer keys ``{key: (M, ...)}`` combined exactly (:func:`mix_exact`); each
            receiver's own value is at its ``self_column``.
        sender_degrees: ``(M,)`` the cohort size of each sender, for ``metropolis``; None when
            the receivers are the senders (``R == M``): taken from ``members`` after the screen.
        same_cluster: ``(R, M)`` bool, True where a sender is in the receiver's true cluster:
            what ``oracle`` mixes over (the simulator knows it; a real peer does not).
        start: ``(R, P)`` each receiver's vector before this round's local training, the
            reference ``fedfomo`` measures gains and distances from; None: the own trained one.
    """

    shared: Tensor
    members: Tensor
    self_column: Tensor
    own: Tensor | None = None
    exact: Mapping[str, Tensor] = field(default_factory=dict)
    sender_degrees: Tensor | None = None
    same_cluster: Tensor | None = None
    start: Tensor | None = None

    @property
    def own_rows(self) -> Tensor:
        """``(R, P)`` each receiver's true vector (``shared`` itself when row i is receiver i's)."""
        if self.own is not None:
            return self.own
        m = self.shared.shape[0]
        if self.self_column.shape[0] == m and bool(
            (self.self_column == torch.arange(m, device=self.self_column.device)).all()
        ):
            return self.shared
        return self.shared[self.self_column]


@dataclass(frozen=True)
class PrivateTrust:
    """What a private (DP-SGD) trust fit needs besides :class:`Trust` (see :class:`TrustDP`).

    Attributes:
        dp: clip and noise multiplier of the trust fit.
        generators: each receiver's ``TRUST`` generator of the round: its Poisson draws.
        counts: each receiver's number of validation examples ``n_r``; it samples each of them
            with rate ``q_r = min(1, trust_batch_size / n_r)`` every step.
        take: ``positions (R, B) -> (inputs (R, B, ...), targets (R, B, ...))``: the examples
            at those positions of each receiver's own validation split (padding positions are
            0, valid for any receiver with data; their results are masked out).
        noise: the Gaussian noise source, ``(R, M)`` normals per step (a real peer seeds it
            secretly; the simulator from its seed).
        example_losses: ``(mixed (R, P), inputs (R, B, ...), targets (R, B, ...)) -> (R, B)``
            each example's loss of its receiver's mixed vector, differentiable in forward mode
            (``torch.func.jvp``); completed like ``Trust.losses``. None: derived from
            ``Trust.losses`` one example at a time (:func:`mean_to_example_losses`), correct but
            about 20 times slower.
    """

    dp: TrustDP
    generators: Sequence[torch.Generator]
    counts: Sequence[int]
    take: Callable[[Tensor], Batch]
    noise: torch.Generator
    example_losses: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None


@dataclass(frozen=True)
class Trust:
    """Validation inputs of learned trust and FedFomo (``VALIDATED_RULES``) for :func:`mix_round`.

    Attributes:
        logits: ``(R, M)`` the receivers' current trust logits over the senders (``fedfomo``
            reads none).
        draw: a fresh validation batch for every receiver (see :func:`validation_rows`); called
            once per trust step and once for the held-out check (``fedfomo``: once).
        losses: ``(mixed (R, P), inputs, targets) -> (R,)`` each receiver's mean validation loss
            of its mixed vector (differentiable in the vector); the caller completes the state
            with what the vector does not hold (local buffers: the receiver's own).
        fit: False when there is nothing to fit on (no validation data, nobody heard): the
            current logits are used as they are, and ``draw`` is never called.
        private: under example-level DP, the trust fit's DP-SGD inputs; ``draw`` is then never
            called (the fit samples through ``private``, and the held-out check and
            ``fedfomo`` are refused, :func:`check_private_mixing`).
    """

    logits: Tensor
    draw: Callable[[], Batch]
    losses: Callable[[Tensor, Tensor, Tensor], Tensor]
    fit: bool = True
    private: PrivateTrust | None = None


@dataclass(frozen=True)
class Mixed:
    """What :func:`mix_round` made; every mask is ``(R, M)`` and True where something happened.

    Attributes:
        params: ``(R, P)`` each receiver's new vector (its own where the mix was not finite).
        exact: ``{key: (R, ...)}`` the combined integer keys.
        public: ``(R, P)`` what each receiver's cohort can compute of its mix (the mix with its
            shared row as its own); None when ``own`` was not given.
        weights: ``(R, M)`` the weights used; None for robust rules.
        members: who was mixed after the screen and trust's exclusions.
        nonfinite: members dropped because their shared row is not finite (never the own).
        implausible: members the plausibility screen dropped.
        distances: ``(R, M)`` float64 distance from each receiver's own vector to every member
            it screened (0 elsewhere); None when nothing was screened.
        excluded: members learned trust (non-finite loss or gradient) or FedFomo (non-finite
            loss) excluded.
        logits: ``(R, M)`` the new trust logits (learned rule); None otherwise.
        kept: ``(R,)`` bool, receivers whose learned weights passed the held-out check (None
            without a check).
        unmixed: ``(R,)`` bool, receivers whose mix was not finite and who kept their own.
        releases: per receiver, what its private trust fit released about its validation
            examples this round (:func:`fedtorrent.mixing.trust.trust_releases`), to charge to
            its accountant; empty for every receiver without ``Trust.private``.
    """

    params: Tensor
    exact: dict[str, Tensor]
    public: Tensor | None
    weights: Tensor | None
    members: Tensor
    nonfinite: Tensor
    implausible: Tensor
    distances: Tensor | None
    excluded: Tensor
    logits: Tensor | None
    kept: Tensor | None
    unmixed: Tensor
    releases: tuple[tuple[Release, ...], ...] = ()


def poisson_rows(
    generators: Sequence[torch.Generator], counts: Sequence[int], rates: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Poisson sampling: each receiver keeps each of its validation examples with its rate.

    Receiver r draws ``rand(counts[r])`` from ``generators[r]`` and keeps the positions below
    ``rates[r]`` (the same draws in the engine and in a peer). Returns ``(R, B)`` int64
    positions padded with 0 and the ``(R, B)`` bool mask of the real ones; ``B`` is the largest
    sample, at least 1.
    """
    picks = [
        (torch.rand(int(count), generator=generator) < rate).nonzero().squeeze(1)
        for generator, count, rate in zip(generators, counts, rates, strict=True)
    ]
    width = max(1, *(len(p) for p in picks)) if picks else 1
    positions = torch.zeros(len(picks), width, dtype=torch.long)
    mask = torch.zeros(len(picks), width, dtype=torch.bool)
    for row, pick in enumerate(picks):
        positions[row, : len(pick)] = pick
        mask[row, : len(pick)] = True
    return positions, mask


def example_gradients(
    logits: Tensor,
    members: Tensor,
    batch: Batch,
    *,
    example_losses: Callable[[Tensor, Tensor, Tensor], Tensor],
    floor: float,
) -> Tensor:
    """``(R, B, M)`` each example's gradient of its own loss with respect to its receiver's logits.

    Example b of receiver r: ``d/d a_r  L(sum_j W_rj(a_r) theta_j; x_rb, y_rb)``, exact, by
    forward-mode differentiation (``torch.func.jvp``): rows are independent, so the k-th
    tangent is 1 at every row's k-th member at once, and ``cohort`` forward passes (one per
    member but the last, whose entry follows from the others') of the mixed models over the
    batch give every example's whole gradient (a non-member's entry is 0).
    Nothing of size ``B x P`` is ever held (reverse mode under ``vmap`` would hold per-example
    gradients of the mixed vectors, ``(B, R, P)``: 10 times slower on MNIST logreg).

    Args:
        logits: ``(R, M)`` current logits.
        members: ``(R, M)`` bool, the members kept.
        batch: inputs ``(R, B, ...)`` and targets ``(R, B, ...)``.
        example_losses: ``(weights (R, M), inputs, targets) -> (R, B)`` each example's loss of
            the model its receiver mixes with ``weights`` (forward-mode differentiable).
        floor: ``weight_floor`` of :func:`fedtorrent.mixing.trust.trust_weights`.
    """
    inputs, targets = batch
    primal = logits.detach()
    r, m = primal.shape
    columns = torch.arange(m, device=primal.device).expand(r, m)
    order = torch.where(members, columns, m).sort(dim=1).values
    rows = torch.arange(r, device=primal.device)

    def losses_of(a: Tensor) -> Tensor:
        return example_losses(trust_weights(a, members, floor=floor), inputs, targets)

    count = members.sum(dim=1)
    out = primal.new_zeros(r, int(targets.shape[1]), m)
    for k in range(int(count.max()) - 1):
        valid = k < count - 1
        column = order[:, k]
        tangent = primal.new_zeros(r, m)
        tangent[rows[valid], column[valid]] = 1.0
        with _FORWARD_AD:
            derivative: Tensor = jvp(losses_of, (primal,), (tangent,))[1]
        out[rows[valid], :, column[valid]] = derivative[valid].to(out.dtype)
    # The weights do not change when every member's logit moves alike (softmax, and the floor on
    # top of it), so a row's gradient sums to 0 over its members: its last member's entry is
    # minus the others' sum, one forward pass fewer.
    has = count > 0
    last = order[rows, (count - 1).clamp_min(0)]
    out[rows[has], :, last[has]] = -out[has].sum(dim=-1)
    return out


def mean_to_example_losses(
    losses: Callable[[Tensor, Tensor, Tensor], Tensor],
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Per-example losses ``(R, B)`` from a mean loss ``(mixed, x, y) -> (R,)``: one example each.

    Generic but slow (``vmap`` over the examples of a batch of one); pass a real per-example
    loss to :class:`PrivateTrust` where the model offers one.
    """

    def per_example(mixed: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        def one(x: Tensor, y: Tensor) -> Tensor:
            return losses(mixed, x.unsqueeze(1), y.unsqueeze(1))

        out: Tensor = vmap(one, in_dims=(1, 1), out_dims=1)(inputs, targets)
        return out

    return per_example


def validation_rows(
    generators: Sequence[torch.Generator], counts: Sequence[int], size: int
) -> Tensor:
    """``(R, size)`` positions into each receiver's own validation split, one generator each.

    Receiver r draws ``randint(counts[r], (size,))`` from ``generators[r]``: the same draws in the
    engine (all nodes) and in a peer (itself), whatever the other receivers do.
    """
    return torch.stack(
        [
            torch.randint(max(1, int(count)), (size,), generator=generator)
            for generator, count in zip(generators, counts, strict=True)
        ]
    )


def mix_round(cohorts: Cohorts, config: MixingConfig, trust: Trust | None = None) -> Mixed:
    """One round's mixing for every receiver (see the module docstring for the steps).

    Args:
        cohorts: what was received.
        config: the session's mixing settings (rule, screen, trust settings).
        trust: learned trust's logits, batches and loss; required when the rule is ``learned``
            and ``trust_steps > 0`` (without it the logits in ``Trust`` are used as they are, or
            uniform weights when it is None), and for ``fedfomo`` (without a batch every
            receiver keeps its own vector).
    """
    private = None if trust is None else trust.private
    if private is not None:
        check_private_mixing(config)
    shared, members, self_column = cohorts.shared, cohorts.members.clone(), cohorts.self_column
    r = members.shape[0]
    own = cohorts.own_rows
    is_self = torch.zeros_like(members)
    is_self[torch.arange(r, device=members.device), self_column] = True
    members |= is_self
    none = torch.zeros_like(members)
    if config.rule == "none":
        return Mixed(
            params=own.clone(), exact={k: v[self_column].clone() for k, v in cohorts.exact.items()},
            public=None if cohorts.own is None else shared[self_column].clone(),
            weights=is_self.to(torch.float32), members=is_self, nonfinite=none, implausible=none,
            distances=None, excluded=none, logits=None if trust is None else trust.logits,
            kept=None, unmixed=torch.zeros(r, dtype=torch.bool, device=members.device),
            releases=tuple(() for _ in range(r)),
        )  # fmt: skip

    bad = ~finite_rows(shared)
    nonfinite = none
    if bool(bad.any()):
        nonfinite = members & ~is_self & bad.unsqueeze(0)
        members &= ~nonfinite
        if bool(bad[self_column].any()):  # a receiver's own shared row: it mixes its true one
            fix = bad[self_column].unsqueeze(1)
            shared = shared.clone()
            shared[self_column] = torch.where(fix, own, shared[self_column])
    members, implausible, distances = _screen(members & ~is_self, own, shared, config)
    members |= is_self

    excluded, logits, kept = none, None, None
    weights: Tensor | None
    if config.rule not in WEIGHTED_RULES:
        weights = None
        mixed = _robust(members, shared, own, self_column, config)
        public = None if cohorts.own is None else _robust(members, shared, shared[self_column],
                                                          self_column, config)  # fmt: skip
    else:
        if config.rule == "fixed":
            weights = uniform_weights(members)
        elif config.rule == "metropolis":
            weights = metropolis_rows(members, is_self, cohorts.sender_degrees)
        elif config.rule == "oracle":
            if cohorts.same_cluster is None:
                raise ConfigError("oracle mixing needs every node's true cluster (simulator only)")
            weights = uniform_weights(members & (cohorts.same_cluster | is_self))
        elif config.rule == "fedfomo":
            weights, members, excluded = fit_fomo(trust, members, cohorts, shared)
        elif trust is None:
            weights = uniform_weights(members)
        else:
            suspicion = torch.where(members & ~is_self, distances, 0.0)
            suspicion = torch.where(is_self, -torch.inf, suspicion.to(torch.float64))
            weights, logits, members, excluded, kept = fit_trust(
                trust, members, cohorts, shared, config, suspicion=suspicion
            )
        # Without a separate true vector the own correction is 0: skip its passes over P.
        mixed = weighted_mix(weights, shared, cohorts.own, self_column)
        public = None if cohorts.own is None else weighted_mix(weights, shared)
    guarded, unmixed = finite_or_own(mixed, own)
    exact_weights = uniform_weights(members) if weights is None else weights
    exact = {
        key: mix_exact(values, weights=exact_weights, self_column=self_column)
        for key, values in cohorts.exact.items()
    }
    if bool(unmixed.any()):  # a receiver that kept its own vector keeps its own counters too
        exact = {
            key: torch.where(_rows_mask(unmixed, value), cohorts.exact[key][self_column], value)
            for key, value in exact.items()
        }
    return Mixed(
        params=guarded, exact=exact, public=public, weights=weights, members=members,
        nonfinite=nonfinite, implausible=implausible,
        distances=distances if config.plausibility > 0 or config.rule == "learned" else None,
        excluded=excluded, logits=logits, kept=kept, unmixed=unmixed,
        releases=_releases(trust, config, r),
    )  # fmt: skip


def _releases(trust: Trust | None, config: MixingConfig, r: int) -> tuple[tuple[Release, ...], ...]:
    """What each receiver's private trust fit released this round (see ``Mixed.releases``)."""
    if trust is None or trust.private is None or config.rule != "learned":
        return tuple(() for _ in range(r))
    steps = config.trust_steps if trust.fit else 0
    return tuple(
        trust_releases(
            trust.private.dp, count=count, batch_size=config.trust_batch_size, steps=steps
        )
        for count in trust.private.counts
    )


def fit_trust(
    trust: Trust,
    members: Tensor,
    cohorts: Cohorts,
    shared: Tensor,
    config: MixingConfig,
    *,
    suspicion: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Learned trust for every receiver: fit the logits, then the held-out check.

    One validation batch per trust step (``trust.draw``), reused when a row drops a member and is
    recomputed; one more batch scores the learned and the uniform weights for the check.

    Returns:
        ``(weights, logits, members, excluded, kept)``: weights are the learned ones where the
        check passed (or there is no check), uniform over the kept members elsewhere.
    """
    own, self_column = cohorts.own_rows, cohorts.self_column
    steps = config.trust_steps if trust.fit else 0
    if trust.private is not None:
        return _fit_private(
            trust, trust.private, members=members, cohorts=cohorts, shared=shared, config=config,
            steps=steps,
        )  # fmt: skip
    batch: list[Batch] = []

    def next_batch() -> None:
        batch[:] = [trust.draw()]

    def mixed_loss(weights: Tensor, on: Batch | None = None) -> Tensor:
        x, y = batch[0] if on is None else on
        return trust.losses(weighted_mix(weights, shared, own, self_column, dense=True), x, y)

    fit = learn_trust(
        trust.logits,
        mixed_loss=mixed_loss,
        members=members,
        lr=config.trust_lr,
        steps=steps,
        floor=config.weight_floor,
        entropy_penalty=config.entropy_penalty,
        suspicion=suspicion,
        on_step=next_batch,
    )
    weights = trust_weights(fit.logits, fit.members, floor=config.weight_floor).detach()
    if config.trust_margin <= 0 or steps == 0:
        return weights, fit.logits, fit.members, fit.excluded, None
    uniform = uniform_weights(fit.members)
    with torch.no_grad():
        held_out = trust.draw()
        keep = prefer_learned(
            mixed_loss(weights, held_out), mixed_loss(uniform, held_out), margin=config.trust_margin
        )
    chosen = torch.where(keep.unsqueeze(1), weights, uniform)
    return chosen, fit.logits, fit.members, fit.excluded, keep


def _fit_private(
    trust: Trust,
    private: PrivateTrust,
    *,
    members: Tensor,
    cohorts: Cohorts,
    shared: Tensor,
    config: MixingConfig,
    steps: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`fit_trust` under :class:`TrustDP`: DP-SGD on the logits, no held-out check.

    Each step Poisson-samples every receiver's validation examples (:func:`poisson_rows`),
    takes each sampled example's logit gradient (:func:`example_gradients`), clips, sums, adds
    noise and divides by the expected batch (:func:`noisy_gradient`). Nobody is excluded.
    """
    own, self_column = cohorts.own_rows, cohorts.self_column
    if len(private.counts) != members.shape[0] or len(private.generators) != members.shape[0]:
        raise ConfigError(
            f"private trust needs one validation count and generator per receiver "
            f"({members.shape[0]}), got {len(private.counts)} and {len(private.generators)}"
        )
    rates = [trust_sample_rate(int(count), config.trust_batch_size) for count in private.counts]
    expected = torch.tensor(
        [rate * int(count) for rate, count in zip(rates, private.counts, strict=True)],
        dtype=shared.dtype,
        device=shared.device,
    )

    per_example_loss = private.example_losses or mean_to_example_losses(trust.losses)

    def mixed_losses(weights: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return per_example_loss(weighted_mix(weights, shared, own, self_column, dense=True), x, y)

    def gradient(logits: Tensor, kept: Tensor) -> Tensor:
        positions, mask = poisson_rows(private.generators, private.counts, rates)
        batch = private.take(positions.to(shared.device))
        per_example = example_gradients(
            logits, kept, batch, example_losses=mixed_losses, floor=config.weight_floor
        )
        return noisy_gradient(
            per_example, mask.to(shared.device), dp=private.dp, expected=expected,
            members=kept, generator=private.noise,
        )  # fmt: skip

    fit = learn_trust(
        trust.logits,
        private_gradient=gradient,
        members=members,
        lr=config.trust_lr,
        steps=steps,
        floor=config.weight_floor,
        entropy_penalty=config.entropy_penalty,
    )
    weights = trust_weights(fit.logits, fit.members, floor=config.weight_floor).detach()
    return weights, fit.logits, fit.members, fit.excluded, None


def fit_fomo(
    trust: Trust | None, members: Tensor, cohorts: Cohorts, shared: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """FedFomo's weights for every receiver (:func:`fedtorrent.mixing.fomo.fomo_weights`).

    Each receiver draws one validation batch (``trust.draw``, once) and scores on it its
    reference ``cohorts.start`` (its vector before this round's training; None: its own trained
    vector), its own true trained vector and the shared vector of every member left after the
    screen; distances are float64 ``||theta_j - start_i||``. The own trained vector is a
    candidate like any member (it has distance 0, so weight 0, when ``start`` is None). Without
    a batch to score on (``trust`` None or ``trust.fit`` False) or with no member but itself, a
    receiver keeps its own trained vector.

    Returns:
        ``(weights, members, excluded)``: members whose validation loss is not finite are
        excluded (weight 0, counted like learned trust's exclusions).
    """
    r = members.shape[0]
    rows = torch.arange(r, device=members.device)
    self_column, own = cohorts.self_column, cohorts.own_rows
    is_self = torch.zeros_like(members)
    is_self[rows, self_column] = True
    others = members & ~is_self
    excluded = torch.zeros_like(members)
    if trust is None or not trust.fit or not bool(others.any()):
        return is_self.to(torch.float32), members, excluded
    reference = own if cohorts.start is None else cohorts.start
    x, y = trust.draw()
    with torch.no_grad():
        own_loss = trust.losses(own, x, y)
        reference_loss = own_loss if cohorts.start is None else trust.losses(reference, x, y)
        losses = _member_losses(trust, others, self_column, shared, batch=(x, y))
    losses[rows, self_column] = own_loss.to(torch.float64)
    distances = torch.zeros(members.shape, dtype=torch.float64, device=members.device)
    pair_rows, pair_cols = others.nonzero().unbind(1)
    distances[pair_rows, pair_cols] = pair_distances(reference, shared, pair_rows, pair_cols)
    distances[rows, self_column] = pair_distances(reference, own, rows, rows)
    excluded = others & ~torch.isfinite(losses)
    weights = fomo_weights(reference_loss, losses, distances, members & ~excluded, is_self)
    return weights, members & ~excluded, excluded


def _member_losses(
    trust: Trust, candidates: Tensor, self_column: Tensor, shared: Tensor, *, batch: Batch
) -> Tensor:
    """``(R, M)`` float64 ``L_r(shared_j)`` where ``candidates`` (NaN elsewhere).

    One ``trust.losses`` call per slot: call k scores every receiver's k-th candidate at once
    (a receiver with fewer candidates scores its own shared row there, and drops the result).
    """
    r, m = candidates.shape
    columns = torch.arange(m, device=candidates.device).expand(r, m)
    order = torch.where(candidates, columns, m).sort(dim=1).values
    rows = torch.arange(r, device=candidates.device)
    out = torch.full((r, m), torch.nan, dtype=torch.float64, device=candidates.device)
    for k in range(int(candidates.sum(dim=1).max())):
        column = order[:, k]
        valid = column < m
        column = torch.where(valid, column, self_column)
        loss = trust.losses(shared[column], *batch).to(torch.float64)
        out[rows[valid], column[valid]] = loss[valid]
    return out


def weighted_mix(
    weights: Tensor,
    shared: Tensor,
    own: Tensor | None = None,
    self_column: Tensor | None = None,
    *,
    dense: bool = False,
) -> Tensor:
    """``weights @ shared``, plus each receiver's own correction ``w_self (own - shared_self)``.

    Small cohorts in a big swarm (``M > 40`` times the widest row) sum each row's members instead
    of the dense product: ``O(R k P)`` memory traffic instead of ``O(R M P)`` arithmetic, faster
    below about 40 senders per member (measured for logreg and the CNN). ``dense`` forces the
    product (differentiable in ``weights``, as learned trust needs).
    """
    width = int((weights != 0).sum(dim=1).max()) if not dense else 0
    if not dense and shared.shape[0] > 40 * width:
        values, columns = weights.topk(width, dim=1)
        mixed = shared.new_zeros(weights.shape[0], shared.shape[1])
        member = torch.empty_like(mixed)
        for k in range(width):
            torch.index_select(shared, 0, columns[:, k], out=member)
            mixed.addcmul_(values[:, k : k + 1], member)
    else:
        mixed = mix(weights, shared)
    if own is None or self_column is None or own is shared:
        return mixed
    rows = torch.arange(weights.shape[0], device=weights.device)
    return mixed + weights[rows, self_column].unsqueeze(1) * (own - shared[self_column])


def mix_exact(values: Tensor, *, weights: Tensor, self_column: Tensor) -> Tensor:
    """Combine an integer (or bool) key ``(M, ...)`` with ``(R, M)`` weights, exactly.

    Each receiver keeps its own value plus the rounded weighted mean deviation from it, computed
    in float64 (weights renormalised there), so counters that agree stay exactly equal whatever
    the rounding of float32 weights (exact below 2**53), and nothing goes through float32.
    Robust rules pass uniform weights over each cohort. Returns ``(R, ...)`` in the key's dtype.
    """
    w = weights.detach().to(torch.float64)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-300)
    flat = values.reshape(values.shape[0], -1).to(torch.float64)
    own = flat[self_column]
    combined = own + (w @ flat - own).round()
    if values.dtype == torch.bool:
        combined = combined.clamp(0, 1)
    return combined.to(values.dtype).reshape(len(self_column), *values.shape[1:])


def _rows_mask(rows: Tensor, like: Tensor) -> Tensor:
    return rows.reshape(-1, *([1] * (like.ndim - 1)))


def _screen(
    edges: Tensor, own: Tensor, shared: Tensor, config: MixingConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Drop implausible members (``edges`` exclude each receiver's own column).

    Returns:
        The members kept, the ``(R, M)`` mask of those dropped, and the ``(R, M)`` float64
        distances measured (for learned trust's suspicion; 0 where nothing was measured).
    """
    distances = torch.zeros(edges.shape, dtype=torch.float64, device=edges.device)
    dropped = torch.zeros_like(edges)
    if config.plausibility <= 0 and config.rule != "learned":
        return edges, dropped, distances
    rows, cols = edges.nonzero().unbind(1)
    measured = pair_distances(own, shared, rows, cols)
    distances[rows, cols] = measured
    if config.plausibility > 0 and rows.numel():
        own_norm = square_norms(own).sqrt()
        out = implausible_pairs(rows, measured, own_norm, multiple=config.plausibility)
        dropped[rows[out], cols[out]] = True
    return edges & ~dropped, dropped, distances


def _robust(
    members: Tensor, shared: Tensor, own: Tensor, self_column: Tensor, config: MixingConfig
) -> Tensor:
    """Robust rules over ``[own, *cohort]`` per receiver; equal-size cohorts reduced at once."""
    r, m = members.shape
    p = shared.shape[1]
    others = members.clone()
    others[torch.arange(r, device=members.device), self_column] = False
    sizes = others.sum(dim=1)
    columns = torch.arange(m, device=members.device).expand(r, m)
    order = torch.where(others, columns, m).sort(dim=1).values
    out = shared.new_empty(r, p)
    for size in sorted(set(sizes.tolist())):
        group_rows = (sizes == size).nonzero().squeeze(1)
        chunk = max(1, GATHER_BUDGET // max(1, (size + 1) * p))
        for start in range(0, len(group_rows), chunk):
            group = group_rows[start : start + chunk]
            cohort = shared[order[group, :size].reshape(-1)].view(len(group), size, p)
            stack = torch.cat([own[group].unsqueeze(1), cohort], dim=1)
            out[group] = _reduce(stack, config)
    return out


def _reduce(stack: Tensor, config: MixingConfig) -> Tensor:
    if config.rule == "median":
        return coordinate_median(stack)
    if config.rule == "trimmed_mean":
        return trimmed_mean(stack, trim_ratio=config.trim_ratio)
    return krum(stack, byzantine=config.byzantine)
