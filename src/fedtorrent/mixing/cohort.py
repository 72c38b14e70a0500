"""Trust-guided cohorts: whom a node mixes with, chosen by its trust logits, with exploration.

With random cohorts of ``k`` among ``N`` peers a node rarely meets the peers it trusts. With
``MixingConfig.trust_cohorts = e`` a node instead looks at more candidates than it needs (a real
peer: the tracker's answer, ``NeighbourBook.numwant``; the simulator: ``CANDIDATE_FACTOR k``
nodes drawn at random) and :func:`trust_cohort` picks its cohort:

- **exploitation**: ``round(k (1 - e))`` members (halves round up) are the candidates it has seen
  before (they have a trust logit) with the highest logits, ties to the earlier candidate;
- **exploration**: the rest are drawn uniformly at random from all other candidates, seen or not,
  with the node's ``COHORT`` generator of the round (``training.seeds``), so new peers are found
  and a peer whose logit fell is met again now and then.

``e = 1`` is a random choice among the candidates; ``e = 0`` never explores once ``k`` peers are
known. Before a node has seen anyone every member is an exploration draw. The simulator's
:func:`fedtorrent.sim.topology.trust_guided_cohorts` and a real peer's
:meth:`fedtorrent.node.neighbours.NeighbourBook.plan` both call this one function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedtorrent.errors import ConfigError

CANDIDATE_FACTOR = 4
"""Candidates per cohort member: what a peer asks the tracker for (``numwant``, once it knows
enough good neighbours) and how many nodes the simulator samples for each node's choice."""


def exploit_count(size: int, explore: float) -> int:
    """Members picked by trust: ``round(size * (1 - explore))``, halves rounded up."""
    if size < 0 or not 0.0 <= explore <= 1.0:
        raise ConfigError(f"need size >= 0 and explore in [0, 1], got {size} and {explore}")
    return math.floor(size * (1.0 - explore) + 0.5)


def trust_cohort(
    logits: Sequence[float | None],
    *,
    size: int,
    explore: float,
    generator: torch.Generator,
) -> list[int]:
    """Pick a cohort of ``size`` among candidates by trust, with an exploration share.

    Args:
        logits: one entry per candidate, in the caller's order: the node's trust logit for it,
            or None for a candidate it has never heard.
        size: the cohort size ``k``; with ``k`` or fewer candidates every one is chosen.
        explore: the exploration share ``e`` in ``[0, 1]``.
        generator: draws the exploration members (one ``randperm`` of the candidates left).

    Returns:
        Positions into ``logits``, distinct: the trusted members first (highest logit first),
        then the explored ones in the order drawn.
    """
    exploit = exploit_count(size, explore)
    count = len(logits)
    if count <= size:
        return list(range(count))
    scored = sorted((-float(value), i) for i, value in enumerate(logits) if value is not None)
    trusted = [i for _, i in scored[:exploit]]  # highest logit first, ties to the earlier one
    taken = set(trusted)
    rest = [i for i in range(count) if i not in taken]
    order = torch.randperm(len(rest), generator=generator, device=generator.device).tolist()
    return trusted + [rest[j] for j in order[: size - len(trusted)]]
