"""Trust-aware fetching: a peer stops downloading cohort members its learned trust shuts out.

With learned trust a member whose states hurt the peer's validation loss ends up with a weight
near 0: downloading its state every round buys nothing but bytes. :class:`LowTrustSkipper`
remembers, per peer id, how many of the member's last mixed rounds gave it a weight below
``MixingConfig.skip_below``; once ``skip_after`` of them in a row did, the member is **skipped**:
taken out of the round's cohort before anything is dialled, and its slot is left empty (neither
the reserve nor a fresh tracker sample fills it, since saving bytes is the point), unless no
member at all would remain, when one reserve candidate takes a slot.

A skipped member keeps its trust logit (nobody fits it while it is away). After ``skip_after``
skipped rounds it is fetched and mixed once more, a **probe**: if its weight is back above the
threshold it is fetched every round again, else it is skipped for another ``skip_after`` rounds.
So a neighbour that improves can come back, and a liar costs one download in every
``skip_after + 1`` rounds instead of every round. The way back is slow on purpose: its logit
starts where it fell, and a softmax weight near 0 moves little in one round of trust steps.

The bytes a skip saves are estimated as the size of the member's last payload received (0 when
none was ever received). Only rounds in which a member is mixed move its count: a member that
is fetched but not mixed (it timed out, was rejected or screened out) neither counts as low nor
ends its skipping (the neighbour book backs such members off on its own). Nothing here touches
the network, the clock or torch; the counts live in memory only, so after ``--resume`` a peer
fetches everyone again until ``skip_after`` new low rounds have passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from fedtorrent.config import MixingConfig

MAX_ENTRIES = 4096
"""Peers remembered at most (as the neighbour book); the least recently seen are forgotten."""


class _HasPeerId(Protocol):
    @property
    def peer_id(self) -> str: ...


Member = TypeVar("Member", bound=_HasPeerId)


@dataclass
class _Count:
    low: int = 0
    """Mixed rounds in a row in which its weight was below the threshold."""
    skipped: int = 0
    """Rounds in a row it was skipped since it was last mixed."""
    payload_bytes: int = 0
    """Size of the last payload received from it (0: none yet)."""


@dataclass(frozen=True)
class SkipPlan(Generic[Member]):
    """One round's cohort and reserve with the low-trust members taken out.

    ``skipped`` lists the ids taken out of the cohort (in cohort order); ``bytes_saved`` is the
    sum of their last payload sizes. Low-trust peers of the reserve are dropped from it too, but
    are not counted: they would not have been dialled anyway.
    """

    cohort: list[Member]
    reserve: list[Member]
    skipped: list[str]
    bytes_saved: int


class LowTrustSkipper:
    """Which cohort members to leave undownloaded, from their recent mixing weights.

    Args:
        below: the weight threshold; 0 turns skipping off (nothing is ever skipped).
        after: mixed rounds below ``below`` in a row before a member is skipped, and skipped
            rounds before it is probed.
        max_entries: peers remembered at most.
    """

    def __init__(self, *, below: float = 0.0, after: int = 3, max_entries: int = MAX_ENTRIES):
        self.below = below
        self.after = after
        self.max_entries = max_entries
        self._counts: dict[str, _Count] = {}

    @classmethod
    def from_mixing(cls, mixing: MixingConfig) -> LowTrustSkipper:
        """The session's skipper: off unless the rule is ``learned`` and ``skip_below > 0``."""
        if mixing.rule != "learned":
            return cls()
        return cls(below=mixing.skip_below, after=mixing.skip_after)

    @property
    def enabled(self) -> bool:
        """Whether this skipper can skip anyone at all."""
        return self.below > 0

    def skips(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is not to be fetched now (low for ``after`` rounds, no probe due)."""
        count = self._counts.get(peer_id)
        return (
            self.enabled
            and count is not None
            and count.low >= self.after
            and count.skipped < self.after
        )

    def plan(self, cohort: Sequence[Member], reserve: Sequence[Member]) -> SkipPlan[Member]:
        """Take the members :meth:`skips` names out of ``cohort`` and ``reserve``.

        When every cohort member is skipped, the first reserve peer left takes a slot; when the
        reserve has none, the cohort is empty (the peer mixes alone this round).
        """
        skipped = [m for m in cohort if self.skips(m.peer_id)]
        kept = [m for m in cohort if not self.skips(m.peer_id)]
        spare = [m for m in reserve if not self.skips(m.peer_id)]
        if skipped and not kept and spare:
            kept, spare = spare[:1], spare[1:]
        ids = [m.peer_id for m in skipped]
        saved = sum(self._counts[p].payload_bytes for p in ids)
        return SkipPlan(cohort=kept, reserve=spare, skipped=ids, bytes_saved=saved)

    def keep(self, members: Sequence[Member]) -> list[Member]:
        """``members`` without those :meth:`skips` names (e.g. a fresh tracker sample)."""
        return [m for m in members if not self.skips(m.peer_id)]

    def record(
        self,
        *,
        skipped: Sequence[str],
        heard: Sequence[str],
        weights: Sequence[float] | None,
        payload_bytes: dict[str, int],
    ) -> None:
        """Note a round: who was ``skipped``, the weights the mix gave, the payloads received.

        Args:
            skipped: ids the round's :class:`SkipPlan` skipped.
            heard: the members mixed, in the order of ``weights[1:]``.
            weights: the mix's weights over ``[self, *heard]``; None (a rule without weights)
                leaves every count as it is.
            payload_bytes: peer id -> size of the payload it sent this round (any verified reply,
                mixed or not).
        """
        for peer_id in skipped:
            self._entry(peer_id).skipped += 1
        if weights is not None:
            for peer_id, weight in zip(heard, weights[1:], strict=True):
                count = self._entry(peer_id)
                count.low = count.low + 1 if weight < self.below else 0
                count.skipped = 0
        for peer_id, size in payload_bytes.items():
            self._entry(peer_id).payload_bytes = size
        while len(self._counts) > self.max_entries:
            del self._counts[next(iter(self._counts))]

    def _entry(self, peer_id: str) -> _Count:
        """The count of ``peer_id``, moved to the end (most recently seen)."""
        count = self._counts.pop(peer_id, None) or _Count()
        self._counts[peer_id] = count
        return count
