"""Which keys of a state travel how: the state schema's ``share`` as key lists, and exact mixing.

A :class:`StateLayout` splits a state dict by the schema (:mod:`fedtorrent.state.schema`):
``mix`` keys go through the float32 vector that screens, trust and mixing rules work on;
``exact`` keys (integer buffers such as BatchNorm's ``num_batches_tracked``) are combined in
float64 and rounded back to their own dtype (:func:`fedtorrent.mixing.round.mix_exact`), never
through float32; ``local`` keys never leave the node. ``parameters`` are the keys privacy noise
and attacks touch (buffers never are).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

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
