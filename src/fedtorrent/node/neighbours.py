"""A peer's memory of its neighbours: who answered, who failed, who is backed off; cohort choice.

The tracker's list is not to be trusted: anyone may announce thousands of peer ids that are dead
(closed ports), silent or lying. A peer therefore keeps a :class:`NeighbourBook`, plain data in
memory (saved in the checkpoint, so ``--resume`` keeps it), with one :class:`Neighbour` per peer
it dialled: how each exchange with it ended, and until which round it is backed off.

Outcomes of one exchange (what :meth:`NeighbourBook.record` takes):

- ``fresh`` or ``stale``: a verified state came; the neighbour is *good*, its failures reset;
- ``refused:not_ready``: it answered but has no state yet (it just started), or ``too_stale``:
  its newest state is older than the asynchronous mode accepts (``--staleness``): alive, neutral;
- ``rejected:<reason>``: it sent something that failed a check (a lie);
- anything else (``timeout``, ``unreachable``, ``handshake_failed``, ``refused:<reason>``): a
  failure.

Backoff, counted in rounds: after its ``n``-th failure in a row a neighbour is skipped for
``min(2 ** (n - 1), max_backoff)`` rounds, after a rejection for ``rejected_factor`` times that
(capped at ``max_rejected_backoff``). A good neighbour's first fast failure (``unreachable``,
``refused:...``) is forgiven: it cost nothing and one glitch should not cost a round without it.
A ``timeout`` never is: the neighbour said nothing at all for a whole deadline (one that is
merely behind answers with its older state), so it is dead or silent, and dialling it again would
cost another deadline. A neighbour listed at a new address gets one retry at once, keeping its
failure count (a restarted peer announces again from a new port; a liar that moves gains one
dial). The tracker's list says nothing about when a peer last announced, so a dead neighbour
still listed at its old address is probed again only when its backoff ends, and with the short
first-contact timeout (below), not a whole deadline.

Cohort choice (:meth:`NeighbourBook.plan`), over the tracker's list after the key and allow-list
checks, in order of preference:

1. good neighbours the tracker listed, in the tracker's (random) order, up to ``cohort_size -
   explore`` of them, where ``explore = floor(explore_share * cohort_size)``;
2. good neighbours it did not list this time (most recently good first): the tracker's sample
   may be drowned in fakes, a neighbour that answered last round is most likely still there;
3. candidates never dialled (or that only said "not ready"), in the tracker's order: exploration,
   so new honest peers are found;
4. the rest of the good ones, then candidates whose backoff expired.

With trust-guided cohorts (``MixingConfig.trust_cohorts``, a :class:`TrustChoice`) the cohort is
instead :func:`fedtorrent.mixing.cohort.trust_cohort` over all of those candidates in that order
(the simulator's function): the members of highest trust logit, then a random share, and the
reserve is the rest in the order above.

The first ``cohort_size`` are the cohort, the rest its reserve (what the exchange dials instead
of a member that fails fast). Backed-off candidates are skipped (``backed_off``). Candidates
that never brought a state, or failed the last time they were dialled, are *first contacts*: the
exchange gives them ``first_contact_s`` (a few round trips) to say anything at all. When every
neighbour always answers and the tracker lists them all, the cohort is the tracker's first
``cohort_size`` peers: today's choice. Nothing here touches the network or the clock.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtorrent.errors import ConfigError, StateError
from fedtorrent.mixing.cohort import CANDIDATE_FACTOR, trust_cohort

ANSWERED = frozenset({"fresh", "stale"})
ALIVE = frozenset({"refused:not_ready", "too_stale"})
MAX_NUMWANT = 200
"""The most candidates a peer asks the tracker for (the tracker's default ``max_numwant``)."""


@dataclass(frozen=True)
class BookSettings:
    """How a peer backs off and explores; the defaults are documented in ``docs/peer.md``."""

    max_backoff: int = 16
    """Rounds a failing neighbour is skipped at most."""
    rejected_factor: int = 4
    """A rejection backs off this many times longer than a failure."""
    max_rejected_backoff: int = 64
    explore_share: float = 0.25
    """Share of the cohort kept for never-dialled candidates while good ones would fill it."""
    numwant_factor: int = CANDIDATE_FACTOR
    """Ask the tracker for this many times the cohort (at most ``MAX_NUMWANT``) once the book
    knows enough good neighbours to fill the cohort; ``MAX_NUMWANT`` until then."""
    max_entries: int = 4096
    """Neighbours remembered at most; the least recently dialled failures are forgotten first."""
    first_contact_rtts: float = 4.0
    """A never-answered candidate gets this many times the slowest recent good round trip..."""
    first_contact_floor_s: float = 1.0
    """... but at least this many seconds, to give its first answer."""

    def __post_init__(self) -> None:
        if not (1 <= self.max_backoff <= self.max_rejected_backoff and self.rejected_factor >= 1):
            raise ConfigError("backoffs must satisfy 1 <= max_backoff <= max_rejected_backoff")
        if not 0.0 <= self.explore_share < 1.0:
            raise ConfigError(f"explore_share must be in [0, 1), got {self.explore_share}")
        if self.numwant_factor < 1 or self.max_entries < 1:
            raise ConfigError("numwant_factor and max_entries must be >= 1")
        if not (self.first_contact_rtts > 0 and self.first_contact_floor_s > 0):
            raise ConfigError("first-contact settings must be > 0")


@dataclass(frozen=True)
class Candidate:
    """A peer the peer may dial: its id, where it listens and the Ed25519 key (hex) it announced."""

    peer_id: str
    address: str
    pubkey: str


@dataclass
class Neighbour:
    """What a peer remembers of one neighbour; rounds are the peer's own (1-based)."""

    peer_id: str
    address: str
    pubkey: str
    answers: int = 0
    """Exchanges that brought a verified state."""
    failures: int = 0
    """Failures (and rejections) in a row since its last answer."""
    last_answer: int = 0
    """Round of its last verified state (0: never)."""
    last_dialled: int = 0
    skip_until: int = 0
    """Not dialled in rounds up to and including this one."""
    outcomes: Counter[str] = field(default_factory=Counter)
    """Exchanges by outcome (``fresh``, ``timeout``, ``rejected:bad_sig``, ...)."""

    @property
    def good(self) -> bool:
        """It brought a verified state before and has not failed since."""
        return self.answers > 0 and self.failures == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (for the checkpoint)."""
        return {
            "peer_id": self.peer_id,
            "address": self.address,
            "pubkey": self.pubkey,
            "answers": self.answers,
            "failures": self.failures,
            "last_answer": self.last_answer,
            "last_dialled": self.last_dialled,
            "skip_until": self.skip_until,
            "outcomes": dict(self.outcomes),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Neighbour:
        """Read :meth:`to_dict`'s form back; raises ``StateError`` on wrong types or ranges."""
        if not isinstance(data, dict):
            raise StateError("a neighbour entry must be an object")
        texts = [data.get(k) for k in ("peer_id", "address", "pubkey")]
        counts = [data.get(k) for k in ("answers", "failures", "last_answer", "last_dialled")]
        counts.append(data.get("skip_until"))
        outcomes = data.get("outcomes")
        if not all(isinstance(t, str) and 0 < len(t) <= 256 for t in texts):
            raise StateError("a neighbour entry needs peer_id, address and pubkey strings")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise StateError("a neighbour entry's counters must be integers >= 0")
        if not isinstance(outcomes, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in outcomes.items()
        ):
            raise StateError("a neighbour entry's outcomes must map names to counts")
        peer_id, address, pubkey = (str(t) for t in texts)
        answers, failures, last_answer, last_dialled, skip_until = (int(c or 0) for c in counts)
        return cls(
            peer_id,
            address,
            pubkey,
            answers=answers,
            failures=failures,
            last_answer=last_answer,
            last_dialled=last_dialled,
            skip_until=skip_until,
            outcomes=Counter({str(k): int(v) for k, v in outcomes.items()}),
        )


@dataclass(frozen=True)
class TrustChoice:
    """Trust-guided cohorts for one round: the peer's logits, its exploration share, its draws.

    ``logits`` holds a logit for every peer heard before (``TrustLearner.known``); ``explore``
    is ``MixingConfig.trust_cohorts``; ``generator`` the peer's ``COHORT`` generator of the
    round (``training.seeds``).
    """

    logits: Mapping[str, float]
    explore: float
    generator: torch.Generator


@dataclass(frozen=True)
class Plan:
    """One round's choice: whom to dial first, whom instead, whom not at all.

    ``cohort`` has at most ``cohort_size`` candidates; ``reserve`` is what the exchange dials, in
    order, in place of a member that failed fast; ``skipped`` maps a peer id to ``backed_off``;
    ``first_contact`` holds the ids of candidates that never brought a state or failed the last
    time they were dialled (they get the short first-contact timeout).
    """

    cohort: list[Candidate]
    reserve: list[Candidate]
    skipped: dict[str, str]
    first_contact: frozenset[str]


class NeighbourBook:
    """Outcomes and backoff per neighbour, and the cohort choice they drive (module docstring)."""

    def __init__(self, settings: BookSettings | None = None) -> None:
        self.settings = settings or BookSettings()
        self.entries: dict[str, Neighbour] = {}
        self._rtts: deque[float] = deque(maxlen=32)

    def numwant(self, cohort_size: int) -> int:
        """How many candidates to ask the tracker for.

        ``numwant_factor`` times the cohort (capped at ``MAX_NUMWANT``), or ``MAX_NUMWANT`` while
        the book knows fewer good neighbours than the cohort holds.
        """
        if sum(n.good for n in self.entries.values()) < cohort_size:
            return MAX_NUMWANT
        return max(1, min(MAX_NUMWANT, self.settings.numwant_factor * cohort_size))

    def backed_off(self, round: int) -> int:
        """How many remembered neighbours are backed off in ``round``."""
        return sum(n.skip_until >= round for n in self.entries.values())

    def alive(self, peer_id: str) -> bool:
        """Whether ``peer_id`` ever answered: with a verified state or a "not ready"."""
        entry = self.entries.get(peer_id)
        return entry is not None and (entry.answers > 0 or any(o in entry.outcomes for o in ALIVE))

    def heard(self) -> int:
        """How many distinct neighbours ever brought a verified state."""
        return sum(n.answers > 0 for n in self.entries.values())

    def first_contact_s(self) -> float | None:
        """Seconds a never-answered candidate gets for its first answer; None: no measure yet.

        ``first_contact_rtts`` times the slowest of the last good round trips, at least
        ``first_contact_floor_s``.
        """
        if not self._rtts:
            return None
        return max(
            self.settings.first_contact_floor_s, self.settings.first_contact_rtts * max(self._rtts)
        )

    def plan(
        self,
        listed: Sequence[Candidate],
        *,
        round: int,
        cohort_size: int,
        by_trust: TrustChoice | None = None,
    ) -> Plan:
        """Choose ``round``'s cohort from the tracker's ``listed`` candidates and the book.

        A listed candidate whose key differs from the remembered one is a stranger: its entry is
        dropped. A listed address that differs from the remembered one ends the backoff once.
        With ``by_trust`` the cohort is chosen by trust (module docstring).
        """
        skipped: dict[str, str] = {}
        listed_good: list[Candidate] = []
        unknown: list[Candidate] = []
        retry: list[Candidate] = []
        seen: set[str] = set()
        for candidate in listed:
            if candidate.peer_id in seen:
                continue
            seen.add(candidate.peer_id)
            entry = self.entries.get(candidate.peer_id)
            if entry is not None and entry.pubkey != candidate.pubkey:
                del self.entries[candidate.peer_id]
                entry = None
            if entry is not None and entry.address != candidate.address:
                entry.address, entry.skip_until = candidate.address, 0
            if entry is None or (entry.answers == 0 and entry.failures == 0):
                unknown.append(candidate)
            elif entry.skip_until >= round:
                skipped[candidate.peer_id] = "backed_off"
            elif entry.good:
                listed_good.append(candidate)
            else:
                retry.append(candidate)
        remembered = sorted(
            (
                n
                for n in self.entries.values()
                if n.good and n.peer_id not in seen and n.skip_until < round
            ),
            key=lambda n: -n.last_answer,
        )
        good = listed_good + [Candidate(n.peer_id, n.address, n.pubkey) for n in remembered]
        explore = math.floor(self.settings.explore_share * cohort_size) if unknown else 0
        first = good[: max(0, cohort_size - explore)]
        ordered = first + unknown + good[len(first) :] + retry
        if by_trust is not None:
            picked = trust_cohort(
                [by_trust.logits.get(c.peer_id) for c in ordered],
                size=cohort_size,
                explore=by_trust.explore,
                generator=by_trust.generator,
            )
            chosen = set(picked)
            ordered = [ordered[i] for i in picked] + [
                c for i, c in enumerate(ordered) if i not in chosen
            ]
        fresh = frozenset(
            c.peer_id for c in ordered
            if (e := self.entries.get(c.peer_id)) is None or e.answers == 0 or e.failures > 0
        )  # fmt: skip
        return Plan(
            cohort=ordered[:cohort_size],
            reserve=ordered[cohort_size:],
            skipped=skipped,
            first_contact=fresh,
        )

    def record(
        self,
        round: int,
        outcomes: Mapping[str, str],
        dialled: Iterable[Candidate],
        *,
        rtts: Mapping[str, float] | None = None,
    ) -> None:
        """Note how each dialled candidate's exchange ended in ``round`` and set its backoff.

        ``outcomes`` maps peer ids to outcome words (module docstring); ``rtts`` the round trips
        of verified states (they set the first-contact timeout).
        """
        settings = self.settings
        for candidate in dialled:
            outcome = outcomes.get(candidate.peer_id)
            if outcome is None:
                continue
            entry = self.entries.get(candidate.peer_id)
            if entry is None:
                entry = Neighbour(candidate.peer_id, candidate.address, candidate.pubkey)
                self.entries[candidate.peer_id] = entry
            entry.last_dialled = round
            entry.outcomes[outcome] += 1
            if outcome in ANSWERED:
                entry.answers += 1
                entry.failures, entry.last_answer, entry.skip_until = 0, round, 0
                continue
            if outcome in ALIVE:
                continue
            forgiven = entry.good  # a good neighbour's first fast failure costs it nothing
            entry.failures += 1
            if forgiven and outcome != "timeout" and not outcome.startswith("rejected:"):
                continue
            steps = 2 ** min(entry.failures - 1, 30)
            if outcome.startswith("rejected:"):
                rounds = min(settings.rejected_factor * steps, settings.max_rejected_backoff)
            else:
                rounds = min(steps, settings.max_backoff)
            entry.skip_until = round + rounds
        for seconds in (rtts or {}).values():
            if math.isfinite(seconds) and seconds >= 0:
                self._rtts.append(seconds)
        self._forget()

    def _forget(self) -> None:
        """Keep at most ``max_entries``: drop never-good ones dialled longest ago, then others."""
        excess = len(self.entries) - self.settings.max_entries
        if excess <= 0:
            return
        order = sorted(self.entries.values(), key=lambda n: (n.answers > 0, n.last_dialled))
        for entry in order[:excess]:
            del self.entries[entry.peer_id]

    def state_dict(self) -> dict[str, Any]:
        """JSON form of the book (for the checkpoint)."""
        return {
            "entries": [n.to_dict() for n in self.entries.values()],
            "rtts": list(self._rtts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s form; raises ``StateError`` when it does not check."""
        entries, rtts = state.get("entries", []), state.get("rtts", [])
        if not isinstance(entries, list) or len(entries) > self.settings.max_entries:
            raise StateError("checkpoint neighbours: entries must be a list within max_entries")
        if not isinstance(rtts, list) or not all(
            isinstance(s, float | int) and not isinstance(s, bool) and math.isfinite(s) and s >= 0
            for s in rtts
        ):
            raise StateError("checkpoint neighbours: rtts must be finite numbers >= 0")
        loaded = [Neighbour.from_dict(e) for e in entries]
        self.entries = {n.peer_id: n for n in loaded}
        self._rtts = deque((float(s) for s in rtts), maxlen=32)
