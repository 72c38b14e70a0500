"""Which keys of a state travel how: the state schema's ``share`` as key lists, and exact mixing.

A :class:`StateLayout` splits a state dict by the schema (:mod:`fedtorrent.state.schema`):
``mix`` keys go through the float32 vector that screens, trust and mixing rules work on;
``exact`` keys (integer buffers such as BatchNorm's ``num_batches_tracked``) are combined in
float64 and rounded back to their own dtype by :func:`mix_exact`, never through float32; ``local``
keys never leave the node. ``parameters`` are the keys privacy noise and attacks touch (buffers
never are).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtorrent.config import MixingConfig

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StateLayout:
    """Sorted key lists of one schema, by how each key travels."""

    mix: tuple[str, ...]
    exact: tuple[str, ...]
    local: tuple[str, ...]
    parameters: tuple[str, ...]

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any]) -> StateLayout:
        """The layout of a validated schema (``state_schema`` or ``validate_schema`` output)."""
        tensors = schema["tensors"]

        def keys(test: Any) -> tuple[str, ...]:
            return tuple(sorted(k for k, entry in tensors.items() if test(entry)))

        return cls(
            mix=keys(lambda e: e["share"] == "mix"),
            exact=keys(lambda e: e["share"] == "exact"),
            local=keys(lambda e: e["share"] == "local"),
            parameters=keys(lambda e: e["kind"] == "parameter"),
        )

    @property
    def shared(self) -> tuple[str, ...]:
        """The keys a node sends (``mix`` and ``exact``), sorted."""
        return tuple(sorted(self.mix + self.exact))


def pick(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> State:
    """The entries of ``state`` at ``keys`` (the tensors themselves, not copies)."""
    return {key: state[key] for key in keys}


def mix_exact(
    values: Sequence[torch.Tensor], *, config: MixingConfig, weights: torch.Tensor | None
) -> torch.Tensor:
    """Combine one integer (or bool) key over ``[self, *heard]`` without a float32 round trip.

    Weighted rules take the weighted mean with ``weights`` (``none``: own value, ``fixed`` or no
    weights: equal weights); robust rules (median, trimmed mean, Krum) take the coordinate median.
    Computed in float64, rounded to the nearest integer and cast back to the key's dtype, so
    counters that agree stay exactly equal (exact below 2**53).
    """
    own = values[0]
    if config.rule == "none" or len(values) == 1:
        return own.clone()
    stack = torch.stack([v.to(torch.float64) for v in values])
    if config.rule in ("fixed", "metropolis", "learned"):
        if weights is None or config.rule == "fixed":
            weights = torch.full((len(values),), 1.0 / len(values))
        # float32 weights sum to 1 only within 1e-7, which would move a counter above 2**23;
        # renormalised in float64 they agree with 1 to 1e-16.
        exact = weights.to(torch.float64)
        shaped = (exact / exact.sum()).reshape(-1, *([1] * own.ndim))
        combined = (shaped * stack).sum(dim=0)
    else:
        combined = stack.median(dim=0).values
    return combined.round().to(own.dtype)
