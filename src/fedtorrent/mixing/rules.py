"""Mixing rules as pure functions over stacked flat parameter vectors.

One code path serves a single peer and the whole simulator:

- **per-node stacks**: ``stack`` is ``(..., M, P)``: M parameter vectors of length P (a node and
  its cohort); weights are ``(..., M)``. A real peer passes ``(M, P)`` with its own vector in row
  0; the simulator may pass ``(N, M, P)`` gathered for N nodes at once.
- **shared stack**: ``stack`` is ``(N, P)`` (every node's vector once) and weights are an
  ``(N, N)`` row-stochastic matrix, dense or sparse, zero outside each node's cohort plus itself.

Robust rules (median, trimmed mean, Krum) reduce over the second-to-last axis of a per-node stack.
None of them overflows on finite input, however large (up to float32's 3.4e38): the median halves
before it adds, and a trimmed mean or Krum distance that is not finite in float32 is recomputed in
float64 (only then, so ordinary inputs give exactly the float32 results).
"""

from __future__ import annotations

import torch

from fedtorrent.config import MIXING_RULES, MixingConfig
from fedtorrent.errors import ConfigError, UnknownNameError

Tensor = torch.Tensor


def mix(weights: Tensor, stack: Tensor) -> Tensor:
    """DeGroot step: weighted sums of parameter vectors.

    Args:
        weights: ``(..., M)`` per-node weights, or an ``(N, N)`` matrix (dense or sparse).
        stack: ``(..., M, P)`` per-node stacks, or ``(N, P)`` shared by every row of ``weights``.

    Returns:
        ``(..., P)``: one mixed vector per row of ``weights``.
    """
    if stack.ndim == weights.ndim + 1 and stack.shape[:-1] == weights.shape:
        return torch.einsum("...m,...mp->...p", weights, stack)
    if weights.ndim == 2 and stack.ndim == 2 and weights.shape[1] == stack.shape[0]:
        return weights @ stack
    raise ConfigError(
        f"cannot mix weights of shape {tuple(weights.shape)} with a stack of shape "
        f"{tuple(stack.shape)}"
    )


def uniform_weights(members: Tensor) -> Tensor:
    """Equal weight over each row's members (``fixed`` sharing).

    Args:
        members: ``(..., M)`` bool: who is in the cohort plus self. Every row needs one member.
    """
    counts = members.sum(dim=-1, keepdim=True)
    if bool((counts == 0).any()):
        raise ConfigError("every row of members needs at least one member (the node itself)")
    return members.to(torch.float32) / counts.to(torch.float32)


def identity_weights(num_nodes: int) -> Tensor:
    """``none``: every node keeps its own parameters."""
    return torch.eye(num_nodes)


def metropolis_rows(
    members: Tensor, is_self: Tensor, sender_degrees: Tensor | None = None
) -> Tensor:
    """Metropolis-Hastings weights ``W_rj = 1 / (1 + max(d_r, d_j))`` on members, the rest on self.

    Args:
        members: ``(R, M)`` bool: whom each receiver mixes (its own column may be set or not).
        is_self: ``(R, M)`` bool: each receiver's own column.
        sender_degrees: ``(M,)`` each sender's cohort size ``d_j``; None when the receivers are
            the senders (``R == M``): each row's own count of members. ``d_r`` is always the
            receiver's count of members other than itself.
    """
    edges = members & ~is_self
    degree = edges.sum(dim=1).to(torch.float32)
    senders = degree if sender_degrees is None else sender_degrees.to(torch.float32)
    pair = 1.0 / (1.0 + torch.maximum(degree[:, None], senders[None, :]))
    weights = torch.where(edges, pair, 0.0)
    return weights + is_self * (1.0 - weights.sum(dim=1, keepdim=True))


def metropolis_weights(adjacency: Tensor) -> Tensor:
    """Metropolis-Hastings weights for a whole graph (:func:`metropolis_rows`, ``R = M = N``).

    On an undirected graph the result is symmetric and doubly stochastic, so repeated mixing
    converges to the plain average even when degrees differ. Directed cohorts still give
    row-stochastic weights (``d`` is each row's out-degree).

    Args:
        adjacency: ``(N, N)`` bool, True where i mixes j's parameters; the diagonal is ignored.
    """
    eye = torch.eye(adjacency.shape[0], dtype=torch.bool, device=adjacency.device)
    return metropolis_rows(adjacency.to(torch.bool), eye)


def metropolis_row(self_degree: int, neighbour_degrees: Tensor) -> Tensor:
    """Metropolis-Hastings weights for one peer: ``(1 + k,)`` over ``[self, *neighbours]``.

    ``self_degree`` is at least the number of neighbours listed (a receiver's own degree).
    """
    k = neighbour_degrees.shape[0]
    members = torch.ones(1, k + 1, dtype=torch.bool)
    is_self = torch.zeros(1, k + 1, dtype=torch.bool)
    is_self[0, 0] = True
    degrees = torch.cat([torch.zeros(1), neighbour_degrees.to(torch.float32)])
    degrees = torch.clamp(degrees, min=float(self_degree))
    return metropolis_rows(members, is_self, degrees)[0]


def coordinate_median(stack: Tensor) -> Tensor:
    """Per coordinate, the median over the M rows (mean of the two middle values when M is even)."""
    m = stack.shape[-2]
    ordered = stack.sort(dim=-2).values
    lo, hi = (m - 1) // 2, m // 2
    # Halving first cannot overflow, and gives exactly 0.5 * (a + b) in binary floating point.
    return 0.5 * ordered[..., lo, :] + 0.5 * ordered[..., hi, :]


def trimmed_mean(stack: Tensor, *, trim_ratio: float) -> Tensor:
    """Per coordinate, the mean after dropping ``floor(trim_ratio * M)`` values at each end."""
    if not 0 <= trim_ratio < 0.5:
        raise ConfigError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    m = stack.shape[-2]
    cut = int(trim_ratio * m)
    kept = stack.sort(dim=-2).values[..., cut : m - cut, :]
    out = kept.mean(dim=-2)
    bad = ~torch.isfinite(out)
    if bool(bad.any()):  # the float32 sum overflowed: the mean itself is within range
        out = torch.where(bad, kept.to(torch.float64).mean(dim=-2).to(out.dtype), out)
    return out


def krum_scores(stack: Tensor, *, byzantine: int) -> Tensor:
    """Krum score of each row: summed squared distance to its ``M - byzantine - 2`` nearest rows.

    With fewer rows than Krum's guarantee needs (``M <= 2 * byzantine + 2``) the neighbourhood is
    clamped to one row, so the rule still picks the most central vector.

    Returns:
        ``(..., M)``; lower is more central.
    """
    if byzantine < 0:
        raise ConfigError(f"byzantine must be >= 0, got {byzantine}")
    m = stack.shape[-2]
    if m == 1:
        return torch.zeros(stack.shape[:-1])
    distances = torch.cdist(stack, stack).square()
    if not bool(torch.isfinite(distances).all()):
        # float32 overflowed (or cancelled to NaN); float64 holds (2 * 3.4e38)^2 * P exactly enough.
        wide = stack.to(torch.float64)
        distances = torch.cdist(wide, wide).square()
    nearest = max(1, min(m - 1, m - byzantine - 2))
    # Each row's zero distance to itself sorts first; skip it.
    ordered = distances.sort(dim=-1).values[..., 1 : 1 + nearest]
    return ordered.sum(dim=-1)


def krum(stack: Tensor, *, byzantine: int) -> Tensor:
    """The row with the lowest Krum score (Blanchard et al., 2017): ``(..., P)``."""
    best = krum_scores(stack, byzantine=byzantine).argmin(dim=-1)
    index = best[..., None, None].expand(*best.shape, 1, stack.shape[-1])
    return stack.gather(-2, index).squeeze(-2)


WEIGHTED_RULES = ("none", "fixed", "metropolis", "learned", "fedfomo", "oracle")
"""Rules that are a weighted average; the others are robust aggregators."""


def mix_stack(stack: Tensor, *, config: MixingConfig, weights: Tensor | None = None) -> Tensor:
    """Apply ``config.rule`` to per-node stacks ``(..., M, P)`` whose row 0 is the node itself.

    ``metropolis``, ``learned``, ``fedfomo`` and ``oracle`` need ``weights`` (``(..., M)``, e.g.
    from :func:`metropolis_row`, :meth:`TrustLearner.learn` or
    :func:`fedtorrent.mixing.fomo.fomo_weights`); the other rules compute their own.
    """
    rule = config.rule
    if rule == "none":
        return stack[..., 0, :].clone()
    if rule == "fixed":
        members = torch.ones(stack.shape[:-1], dtype=torch.bool)
        return mix(uniform_weights(members), stack)
    if rule in ("metropolis", "learned", "fedfomo", "oracle"):
        if weights is None:
            raise ConfigError(f"mixing rule {rule!r} needs weights")
        return mix(weights, stack)
    if rule == "median":
        return coordinate_median(stack)
    if rule == "trimmed_mean":
        return trimmed_mean(stack, trim_ratio=config.trim_ratio)
    if rule == "krum":
        return krum(stack, byzantine=config.byzantine)
    raise UnknownNameError("mixing rule", rule, MIXING_RULES)
