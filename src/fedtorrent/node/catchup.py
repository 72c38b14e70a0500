"""A late joiner's first state: the swarm's current model, fetched from neighbours and checked.

A peer started with ``--join`` and no checkpoint to resume asks up to :data:`JOIN_SOURCES` listed
neighbours for the state each serves now (a request for round 0: whatever it holds), with the
round's own machinery (``node.exchange.Fetcher``): every reply passed the transport's checks
(sizes, keys, shapes, dtypes, finite values), the signature against the key its sender announced
and the replay guard; in a compressed session it is the sender's public copy. Then
:func:`catch_up`:

1. joins at the round most replies hold (ties: the highest), and leaves out replies more than
   one round from it (a neighbour still catching up after a restart, say);
2. with two or more left, screens them as a round does (``mixing.screen``), measured from the
   torrent's initial state, the one vector no neighbour can move: a state far past the lower
   median of ``[initial norm, every distance]`` is rejected as ``implausible``. A lone source is
   taken on its signature: there is nothing to compare it with;
3. adopts the mean of what is left (mixed keys; integer keys from the newest state), so the
   joiner starts where a uniform mix of its sources would have put it, and runs from the next
   round on.

Nothing usable (nobody listed, nobody answered within the exchange timeout, all rejected): the
peer starts from round 1 like any other and says so in its log and its ``joined.json``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedtorrent.mixing.screen import screen_stack
from fedtorrent.net.transport import Reply
from fedtorrent.state.flat import flatten, unflatten
from fedtorrent.state.layout import pick

State = dict[str, torch.Tensor]
JOIN_SOURCES = 3
"""Neighbours a late joiner asks for their state (fewer when fewer are listed)."""


@dataclass(frozen=True)
class Catchup:
    """What a late joiner adopts: ``state`` (the shared keys) as of round ``round``."""

    round: int
    state: State
    sources: dict[str, int]
    """Peer id -> the round of its state in the mean."""
    screened: dict[str, Reply]
    """Replies the plausibility screen rejected."""
    left_out: dict[str, int]
    """Peer id -> round, for replies too far from the round joined at."""


def join_round(rounds: Iterable[int]) -> int:
    """The round most of ``rounds`` are at; ties go to the highest (0 for none)."""
    counts = Counter(rounds)
    if not counts:
        return 0
    return max(counts, key=lambda r: (counts[r], r))


def catch_up(
    replies: Mapping[str, Reply],
    *,
    initial: Mapping[str, torch.Tensor],
    mix: Sequence[str],
    exact: Sequence[str],
    plausibility: float,
) -> Catchup | None:
    """The state to join with, from the verified ``replies`` (see the module docstring).

    Args:
        replies: peer id -> a verified reply with its decoded ``state`` (the shared keys).
        initial: the torrent's initial state (at least the ``mix`` keys).
        mix: the keys that are averaged.
        exact: the integer keys, taken from the newest source.
        plausibility: the session's screen multiple (``MixingConfig.plausibility``; 0: off).

    Returns:
        The adopted state, or None when no reply is left to adopt.
    """
    held = {p: r for p, r in replies.items() if r.state is not None}
    round = join_round(r.header.round for r in held.values())
    near = {p: r for p, r in held.items() if abs(r.header.round - round) <= 1}
    left_out = {p: r.header.round for p, r in held.items() if p not in near}
    screened: dict[str, Reply] = {}
    if len(near) >= 2:
        like = pick(initial, mix)
        rows = [flatten(like)] + [flatten(pick(_state(r), mix)) for r in near.values()]
        rejected, _ = screen_stack(torch.stack(rows).to(torch.float32), multiple=plausibility)
        screened = {p: near[p] for p, bad in zip(near, rejected.tolist(), strict=True) if bad}
    kept = {p: r for p, r in near.items() if p not in screened}
    if not kept:
        return None
    like = pick(initial, mix)
    mean = torch.stack([flatten(pick(_state(r), mix)).to(torch.float32) for r in kept.values()])
    newest = _state(max(kept.values(), key=lambda r: r.header.round))
    state = {**unflatten(mean.mean(dim=0), like), **{k: newest[k].clone() for k in exact}}
    return Catchup(
        round=max(r.header.round for r in kept.values()) if len(kept) == 1 else round,
        state=state,
        sources={p: r.header.round for p, r in kept.items()},
        screened=screened,
        left_out=left_out,
    )


def _state(reply: Reply) -> State:
    assert reply.state is not None  # filtered by the caller
    return reply.state
