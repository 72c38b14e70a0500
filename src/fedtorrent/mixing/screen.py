"""The plausibility screen: received states too far from a node's own model never reach a rule.

Before any rule mixes, node i measures, in float64, the distance ``d_j = ||theta_j - theta_i||``
from its own trained vector to every state it received, and the norm ``||theta_i||`` of its own.
The reference scale is the **lower median** of ``[||theta_i||, d_1, ..., d_k]``; state j is
**implausible**, and rejected, when ``d_j > multiple * reference`` or when ``d_j`` is not finite.

Why this shape:

- Distances are taken from the node's *own* vector, which an attacker cannot move, not from a
  centre of the received states, which it could.
- The median makes the reference robust: an attacker (or several, as long as honest entries are
  at least half of the list) can only push values *above* the lower median, never drag the
  reference up to its own distance. Honest nodes that drift apart (label skew) all move the
  reference together, so they are not rejected for being alike in their disagreement.
- The node's own norm is one more entry, so a lone neighbour, or one attacker of two, is judged
  against the scale of the model itself: with ``[||theta_i||, d]`` the reference is
  ``min(||theta_i||, d)``, which catches ``d > multiple * ||theta_i||`` while two honest models
  of the same task (``d`` well below ``||theta_i||``) always pass.
- float64 keeps every distance finite for finite float32 input (``(2 * 3.4e38)^2 * P`` stays far
  below 1.8e308), so a ``3e38`` state is measured, not turned into ``inf - inf``.
- A reference of 0 (half the list is 0, e.g. an all-zero model and one neighbour) gives no scale
  to judge by: then only non-finite distances are rejected.

What it does not do: a state within the multiple passes, however it was made (the robust rules
and learned trust deal with those); when attackers are the majority of a cohort they set the
reference; heavy privacy noise with a single neighbour can look implausible (raise the multiple
or turn the screen off with 0). Both drivers call these functions: ``sim.engine`` on every
cohort edge at once, ``node.peer`` on its ``(1 + k, P)`` stack.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

_DIRECT_FLOATS = 2**22
"""Float64 values one chunk of direct differences may hold."""
_GRAM_TRUST = 1e-10
"""Below ``d^2 < _GRAM_TRUST * (|a|^2 + |b|^2)`` the Gram form cancels too much; redo directly."""


def pair_distances(own: Tensor, others: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``||others[cols[e]] - own[rows[e]]||`` for every pair ``e``, in float64.

    Dense pair sets go through one float64 Gram product (fast), with pairs the Gram form cannot
    resolve (nearly equal vectors) recomputed directly; sparse ones are computed directly, in the
    inputs' float32 first and again in float64 only for pairs whose float32 norm overflowed.

    Args:
        own: ``(N, P)`` vectors the distances are measured from.
        others: ``(M, P)`` vectors measured.
        rows: ``(E,)`` int64 indices into ``own``.
        cols: ``(E,)`` int64 indices into ``others``.

    Returns:
        ``(E,)`` float64; ``inf`` or NaN only where an input is not finite.
    """
    if rows.numel() == 0:
        return torch.zeros(0, dtype=torch.float64, device=own.device)
    if own.shape[0] * others.shape[0] > 32 * rows.numel():  # few pairs: direct is cheaper
        out = _direct(own, others, rows, cols, own.dtype).to(torch.float64)
        wide = ~torch.isfinite(out)  # overflowed in float32 (or an input is not finite)
        if bool(wide.any()):
            pick = wide.nonzero().squeeze(1)
            out[pick] = _direct(own, others, rows[pick], cols[pick], torch.float64)
        return out
    norm_a, norm_b, gram = _gram(own, others)
    square = norm_a[rows] + norm_b[cols] - 2 * gram[rows, cols]
    out = square.clamp_min(0).sqrt()
    unsure = ~(square > _GRAM_TRUST * (norm_a[rows] + norm_b[cols]))
    if bool(unsure.any()):
        pick = unsure.nonzero().squeeze(1)
        out[pick] = _direct(own, others, rows[pick], cols[pick], torch.float64)
    return out


def _gram(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Squared norms of ``a``'s and ``b``'s rows and ``a @ b.T``, all in float64.

    Column chunks are converted one at a time, so no float64 copy of the inputs is ever held
    (``a is b``, as in the engine, is converted once).
    """
    chunk = max(1, _DIRECT_FLOATS // max(1, a.shape[0] + b.shape[0]))
    gram = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], chunk):
        part_a = a[:, start : start + chunk].to(torch.float64)
        part_b = part_a if a is b else b[:, start : start + chunk].to(torch.float64)
        gram.addmm_(part_a, part_b.T)
    if a is b:
        norms = gram.diagonal().clone()
        return norms, norms, gram
    return square_norms(a), square_norms(b), gram


def square_norms(x: Tensor) -> Tensor:
    """``(R,)`` each row's squared norm in float64, without a float64 copy of ``x``."""
    chunk = max(1, _DIRECT_FLOATS // max(1, x.shape[0]))
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], chunk):
        part = x[:, start : start + chunk].to(torch.float64)
        out += torch.einsum("ij,ij->i", part, part)
    return out


def _direct(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, dtype: torch.dtype) -> Tensor:
    """The pairs' distances from gathered rows, in ``dtype``, a chunk of pairs at a time."""
    chunk = max(1, _DIRECT_FLOATS // max(1, a.shape[1]))
    parts = [
        (b[cols[s : s + chunk]].to(dtype) - a[rows[s : s + chunk]].to(dtype)).norm(dim=1)
        for s in range(0, rows.numel(), chunk)
    ]
    return torch.cat(parts)


def implausible(
    distances: Tensor, own_norm: Tensor, *, multiple: float, valid: Tensor | None = None
) -> Tensor:
    """Which received states the screen rejects (see the module docstring).

    Args:
        distances: ``(..., K)`` float64 distances from each row's own vector to what it received.
        own_norm: ``(...,)`` the norm of each row's own vector.
        multiple: how many reference scales a state may be away; ``<= 0`` turns the screen off.
        valid: ``(..., K)`` bool, which entries were received (padding is False); None: all.

    Returns:
        ``(..., K)`` bool, True where an entry is rejected (never True outside ``valid``).
    """
    if valid is None:
        valid = torch.ones_like(distances, dtype=torch.bool)
    if multiple <= 0:
        return torch.zeros_like(valid)
    finite = torch.isfinite(distances)
    # Non-finite distances count as entries (very far ones) when the median is taken.
    far = torch.where(finite, distances, torch.inf)
    entries = torch.cat([own_norm.to(torch.float64).unsqueeze(-1), far], dim=-1)
    own_entry = torch.ones((*valid.shape[:-1], 1), dtype=torch.bool, device=valid.device)
    padded = torch.cat([own_entry, valid], dim=-1)
    ordered = torch.where(padded, entries, torch.inf).sort(dim=-1).values
    lower_median = (padded.sum(dim=-1, keepdim=True) - 1) // 2
    reference = ordered.gather(-1, lower_median)
    too_far = (distances > multiple * reference) & (reference > 0)
    return valid & (~finite | too_far)


def implausible_pairs(
    rows: Tensor, distances: Tensor, own_norm: Tensor, *, multiple: float
) -> Tensor:
    """:func:`implausible` for a list of pairs: receiver ``rows[e]`` got one at ``distances[e]``.

    Args:
        rows: ``(E,)`` int64 receiver of each pair, sorted (as ``nonzero()`` lists them).
        distances: ``(E,)`` float64.
        own_norm: ``(N,)`` each receiver's own norm.
        multiple: see :func:`implausible`.

    Returns:
        ``(E,)`` bool, True where the receiver rejects the pair's state.
    """
    n = own_norm.shape[0]
    counts = torch.bincount(rows, minlength=n)
    width = int(counts.max()) if rows.numel() else 0
    slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    padded = torch.zeros(n, width, dtype=torch.float64, device=rows.device)
    valid = torch.zeros(n, width, dtype=torch.bool, device=rows.device)
    padded[rows, slot] = distances
    valid[rows, slot] = True
    return implausible(padded, own_norm, multiple=multiple, valid=valid)[rows, slot]


def screen_stack(stack: Tensor, *, multiple: float) -> tuple[Tensor, Tensor]:
    """The screen for one node's ``(1 + k, P)`` stack, own vector in row 0.

    Returns:
        ``(rejected, distances)``: ``(k,)`` bool, True for rows ``1..k`` the screen rejects, and
        their ``(k,)`` float64 distances from row 0.
    """
    k = stack.shape[0] - 1
    index = torch.arange(1, k + 1)
    distances = pair_distances(stack[:1], stack, torch.zeros(k, dtype=torch.long), index)
    own_norm = stack[0].to(torch.float64).norm()
    return implausible(distances, own_norm, multiple=multiple), distances


def finite_or_own(mixed: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
    """The last guard after any rule: a row whose mix is not finite keeps its own vector.

    Args:
        mixed: ``(..., P)`` mixed vectors.
        own: same shape: what each row held before mixing.

    Returns:
        ``(vectors, kept_own)``: the guarded vectors and a ``(...,)`` bool of rows that kept
        their own. ``mixed`` itself is returned when every row is finite.
    """
    bad = ~finite_rows(mixed)
    if not bool(bad.any()):
        return mixed, bad
    return torch.where(bad.unsqueeze(-1), own, mixed), bad


def finite_rows(x: Tensor) -> Tensor:
    """``(...,)`` True where every value of a ``(..., P)`` row is finite.

    One sum per row instead of a mask of ``x``'s size: an inf or NaN makes the sum inf or NaN, so
    a finite sum proves a finite row; only rows whose sum is not finite (overflow of huge finite
    values, or a real inf or NaN) are checked value by value.
    """
    finite = torch.isfinite(x.sum(dim=-1))
    if bool(finite.all()):
        return finite
    unsure = ~finite
    finite[unsure] = torch.isfinite(x[unsure]).all(dim=-1)
    return finite
