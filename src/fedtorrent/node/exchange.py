"""How a peer finds and fetches its cohort: tracker and address contracts, cohort selection, pulls.

The tracker's list goes through the key and allow-list checks, then the peer's neighbour book
(``node.neighbours``) picks the cohort and a reserve. Each neighbour is pulled on its own thread
until the round's deadline, re-asked with backoff while it is behind, and every reply is verified
(signature, replay guard, receive hook) before anything else looks at it; nobody waits on anybody
else (no barrier). A member that fails fast is replaced from the reserve.

What the faults of a round cost is counted too (:meth:`Exchange.costs`, in every round's record):
the requests re-sent, the attempts that brought no state, and the time lost waiting on neighbours
that in the end brought nothing newer.
The asynchronous mode (``max_staleness`` K, the peer's ``--staleness``) waits for nobody: each
member is asked once and its newest state taken when it is at most K rounds behind this peer's
round (newer is fine), else it is dropped as ``too_stale``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from fedtorrent.errors import FedTorrentError, MessageError, NetworkError
from fedtorrent.net.identity import UpdateVerifier, curve_public_key
from fedtorrent.net.torrent import is_info_hash
from fedtorrent.net.tracker.client import PeerAddress, TrackerAnswer
from fedtorrent.net.transport import Endpoint, PeerRefusedError, Reply, Transport
from fedtorrent.node.compressed import Replicas
from fedtorrent.node.neighbours import Candidate, NeighbourBook, TrustChoice

log = logging.getLogger(__name__)
ReceiveHook = Callable[["Reply"], None]
"""Called on every reply that passed the wire checks; raise ``MessageError`` to reject it."""
POLL_FIRST_S = 0.02
POLL_MAX_S = 0.5
"""Backoff between re-asking a neighbour that is not yet at this peer's round."""
SILENT_S = 1.0
"""A neighbour that answered (behind) and then let a request of at least this many seconds time
out went silent (it died mid-round): its older state is still used, its outcome is ``timeout``."""
MAX_REFILLS = 4
"""Times a round may ask the tracker for more candidates when every one tried failed fast."""
Refill = Callable[[set[str]], tuple[list["Endpoint"], frozenset[str]]]
"""``(ids dialled so far) -> (more endpoints, those of them never heard from)``."""


class Announcer(Protocol):
    """What a peer needs from a tracker (``TrackerClient`` is one)."""

    def announce(
        self,
        info_hash: str,
        peer_id: str,
        *,
        port: int,
        event: str = "",
        round: int = 0,
        numwant: int | None = None,
        accuracy: float | None = None,
        bytes_sent: int = 0,
        bytes_received: int = 0,
        pubkey: str | None = None,
        ip: str | None = None,
        hello_port: int | None = None,
    ) -> TrackerAnswer:
        """Announce and return a sample of other peers (raise ``TrackerError`` when down).

        ``hello_port``: where this peer answers hellos, announced instead of ``port`` to a
        standard BitTorrent tracker (``node.hello``).
        """


class Addressing(Protocol):
    """How a transport address maps to what is announced, and tracker entries to endpoints."""

    def port_of(self, address: str) -> int:
        """The port to announce for this peer's bound ``address``."""

    def endpoint(self, peer: PeerAddress) -> Endpoint:
        """Where to reach a peer the tracker listed."""


class TcpAddressing:
    """ZeroMQ over TCP: announce the bound port, dial ``tcp://ip:port``."""

    def port_of(self, address: str) -> int:
        """The port after the last colon of ``tcp://host:port``."""
        return int(address.rsplit(":", 1)[1])

    def endpoint(self, peer: PeerAddress) -> Endpoint:
        """``tcp://ip:port`` (IPv6 in brackets)."""
        host = f"[{peer.ip}]" if ":" in peer.ip else peer.ip
        return Endpoint(peer_id=peer.peer_id, address=f"tcp://{host}:{peer.port}")


@dataclass
class Attempts:
    """What one pull did, written by its own thread and read once it ended."""

    requests: int = 0
    """Fetch requests sent to the neighbour."""
    failed: list[str] = field(default_factory=list)
    """One entry per request that brought no state: ``timeout``, ``unreachable``,
    ``handshake_failed``, ``refused:<why>`` or ``rejected:<reason>``."""
    kept_at: float | None = None
    """``time.monotonic()`` when the reply the pull ended with arrived; None without one."""


@dataclass
class Exchange:
    """What one round's exchange produced; every dialled peer is in exactly one of the dicts."""

    replies: dict[str, Reply] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    """Peer id -> rejection reason (a ``wire.REASONS`` code)."""
    missing: dict[str, str] = field(default_factory=dict)
    """Peer id -> why nothing usable came (``timeout``, ``unreachable``, ``refused:not_ready``,
    ``refused:gone``: it is leaving the swarm)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Peers the tracker listed (or the book remembered) that this peer did not dial:
    ``no_key`` (announced no usable Ed25519 key), ``not_allowed`` (outside a closed swarm's
    allow-list), ``bad_address`` (cannot be reached as listed), ``backed_off`` (failed
    recently, see ``node.neighbours``) or ``low_trust`` (its learned weight stayed too low, see
    ``node.skipping``). Not dialled, so in none of the other dicts."""
    dialled: list[str] = field(default_factory=list)
    """Everyone asked this round, in order: the cohort, then reserve peers that replaced members
    that failed fast (so it may be longer than the cohort; at most ``cohort_size`` answer)."""
    attempts: dict[str, Attempts] = field(default_factory=dict)
    """Dialled peer id -> what its pull did (see :meth:`costs`)."""
    time_lost_s: float = 0.0
    """Seconds from the arrival of the last reply kept (or from the start, when none came) to
    the end of the exchange: time spent waiting on neighbours that in the end brought nothing
    newer (silent, partitioned, too slow, or behind until the deadline). About 0 when every
    member answered fresh, since the exchange ends with its last answer."""

    def costs(self) -> dict[str, Any]:
        """The round's fault figures, JSON-ready.

        ``requests``: fetch requests sent; ``retries``: requests re-sent to a neighbour already
        asked this round (after a stale answer or a refusal such as ``not_ready``: polling a
        neighbour that is behind; a timeout, an unreachable peer or a rejected reply ends the
        pull instead); ``failed``: {kind: n} requests that brought no state (a kind of
        :class:`Attempts.failed`); ``time_lost_s``: see the field.
        """
        asked = [a for a in self.attempts.values() if a.requests]
        return {
            "requests": sum(a.requests for a in asked),
            "retries": sum(a.requests - 1 for a in asked),
            "failed": dict(Counter(kind for a in self.attempts.values() for kind in a.failed)),
            "time_lost_s": self.time_lost_s,
        }

    silent: set[str] = field(default_factory=set)
    """Peers of ``replies`` that went silent after that reply (``SILENT_S``): outcome timeout."""
    arrived: dict[str, float] = field(default_factory=dict)
    """Peer id (of ``replies``) -> ``time.monotonic()`` when its fetch ended with that reply: at
    once for a fresh one, at the deadline for one still behind (``node.deadline``'s lags)."""

    def outcomes(self, round: int) -> dict[str, str]:
        """Peer id -> ``fresh``, ``stale``, ``rejected:<reason>`` or the missing reason."""
        words = {p: f"rejected:{r}" for p, r in self.rejected.items()}
        words.update(self.missing)
        words.update(
            {p: "fresh" if r.header.round >= round else "stale" for p, r in self.replies.items()}
        )
        words.update(dict.fromkeys(self.silent, "timeout"))
        return words


@dataclass(frozen=True)
class Selection:
    """A round's cohort as endpoints (see :class:`~fedtorrent.node.neighbours.Plan`).

    ``keys`` maps every peer in ``cohort`` and ``reserve`` to the Ed25519 key (hex) it announced;
    ``candidates`` the same peers to what the neighbour book records them as.
    """

    cohort: list[Endpoint]
    reserve: list[Endpoint]
    skipped: dict[str, str]
    keys: dict[str, str]
    candidates: dict[str, Candidate]
    first_contact: frozenset[str]
    listed: int
    """How many peers (other than this one) the tracker listed."""

    @classmethod
    def empty(cls) -> Selection:
        """No cohort (nothing listed)."""
        return cls([], [], {}, {}, {}, frozenset(), 0)


def select_cohort(
    listed: Sequence[PeerAddress],
    *,
    peer_id: str,
    cohort_size: int,
    allowed: Sequence[str],
    addressing: Addressing,
    book: NeighbourBook,
    round: int,
    by_trust: TrustChoice | None = None,
) -> Selection:
    """The round's cohort: peers the tracker ``listed`` that this peer may dial, chosen by ``book``.

    Peers without a usable key (``no_key``), outside a closed swarm's allow-list when ``allowed``
    is not empty (``not_allowed``) or with an address that makes no endpoint (``bad_address``)
    are skipped; the book then prefers neighbours that answered before, skips backed-off ones
    (``backed_off``) and keeps room for exploration (``NeighbourBook.plan``), or with
    ``by_trust`` picks the cohort by trust (trust-guided cohorts).
    """
    skipped: dict[str, str] = {}
    candidates: list[Candidate] = []
    endpoints: dict[str, Endpoint] = {}
    others = [p for p in listed if p.peer_id != peer_id]
    for peer in others:
        key = peer.pubkey
        if key is None or not is_info_hash(key):  # none, or a bare Z85 CurveZMQ key
            skipped[peer.peer_id] = "no_key"
            continue
        if allowed and key not in allowed:
            skipped[peer.peer_id] = "not_allowed"
            continue
        try:
            endpoint = addressing.endpoint(peer)
            endpoint = dataclasses.replace(endpoint, public_key=curve_public_key(key))
        except (ValueError, FedTorrentError) as exc:
            log.debug("cannot reach peer %s as listed: %s", peer.peer_id, exc)
            skipped[peer.peer_id] = "bad_address"
            continue
        endpoints[peer.peer_id] = endpoint
        candidates.append(Candidate(peer.peer_id, endpoint.address, key))
    plan = book.plan(candidates, round=round, cohort_size=cohort_size, by_trust=by_trust)
    skipped.update(plan.skipped)

    def endpoint_of(candidate: Candidate) -> Endpoint:
        known = endpoints.get(candidate.peer_id)
        if known is not None:
            return known

        public = curve_public_key(candidate.pubkey)  # checked when it was listed
        return Endpoint(candidate.peer_id, candidate.address, public_key=public)

    chosen = plan.cohort + plan.reserve
    return Selection(
        cohort=[endpoint_of(c) for c in plan.cohort],
        reserve=[endpoint_of(c) for c in plan.reserve],
        skipped=skipped,
        keys={c.peer_id: c.pubkey for c in chosen},
        candidates={c.peer_id: c for c in chosen},
        first_contact=plan.first_contact,
        listed=len(others),
    )


@dataclass(frozen=True, eq=False)
class Fetcher:
    """What one peer's pull threads share: its transport, executor and the checks on replies."""

    transport: Transport
    executor: ThreadPoolExecutor
    like: dict[str, torch.Tensor]
    """The model's state; replies must match its keys, shapes and dtypes."""
    verifier: UpdateVerifier
    keys: Mapping[str, str]
    """Peer id -> the Ed25519 key (hex) it announced; the peer keeps it up to date."""
    stop: threading.Event
    receive_hook: ReceiveHook | None = None
    replicas: Replicas | None = None
    """Compressed sessions: the copies of others' public copies (``node.compressed``); each
    request carries the round held, and a reply becomes the state it stands for."""

    def exchange(
        self,
        cohort: Sequence[Endpoint],
        *,
        round: int,
        deadline: float,
        skipped: Mapping[str, str],
        reserve: Sequence[Endpoint] = (),
        first_contact: Collection[str] = frozenset(),
        first_contact_s: float | None = None,
        refill: Refill | None = None,
        max_refills: int = MAX_REFILLS,
        max_staleness: int | None = None,
    ) -> Exchange:
        """Pull every cohort member's state concurrently, each on its own until ``deadline``.

        Members never wait on each other: a silent one costs its own fetch the deadline, while
        the others are asked again (with backoff) as long as they are behind ``round``. A member
        that fails fast (unreachable, refused, rejected: anything but a timeout) is replaced by
        the next ``reserve`` peer while time is left, so at most ``len(cohort)`` peers answer.
        Peers in ``first_contact`` (never answered before) get ``first_contact_s`` seconds, when
        given, for their first answer of any kind. When the reserve runs dry while a slot is
        free, ``refill`` (given the ids dialled so far) is asked for more, at most
        ``max_refills`` times a round and never again after it found nothing new. With
        ``max_staleness`` (the asynchronous mode) each member is asked once (:meth:`pull`).
        """
        outcome = Exchange(skipped=dict(skipped))
        if not cohort:
            return outcome
        started = time.monotonic()
        spare = deque(reserve)
        fresh = set(first_contact)
        futures: dict[Future[tuple[str, Reply | None, str]], str] = {}
        refills = 0

        def dial(endpoint: Endpoint) -> Future[tuple[str, Reply | None, str]]:
            first = first_contact_s if endpoint.peer_id in fresh else None
            tally = outcome.attempts.setdefault(endpoint.peer_id, Attempts())
            future = self.executor.submit(
                self.pull, endpoint, round, deadline, first, attempts=tally,
                max_staleness=max_staleness,
            )  # fmt: skip
            futures[future] = endpoint.peer_id
            return future

        pending = {dial(e) for e in cohort}
        while pending and not self.stop.is_set():
            remaining = deadline - time.monotonic() + POLL_MAX_S  # fetches end at the deadline
            if remaining <= 0:
                break
            done, pending = wait(
                pending, timeout=min(remaining, POLL_MAX_S), return_when=FIRST_COMPLETED
            )
            ended = time.monotonic()
            for future in done:
                kind, reply, reason = future.result()
                if reply is not None:
                    outcome.arrived[futures[future]] = ended
                if reply is not None or reason == "timeout" or deadline <= time.monotonic():
                    continue
                if not spare and refill is not None and refills < max_refills:
                    refills += 1
                    more, unknown = refill(set(futures.values()))
                    spare.extend(e for e in more if e.peer_id not in futures.values())
                    fresh.update(unknown)
                    if not spare:
                        refills = max_refills  # the tracker has nothing new this round
                if spare:
                    pending.add(dial(spare.popleft()))
        ended = time.monotonic()
        for future, peer_id in futures.items():
            outcome.dialled.append(peer_id)
            if not future.done():
                outcome.missing[peer_id] = "timeout"
                # Still running: a copy, whose request in flight counts as one timeout.
                tally = outcome.attempts[peer_id]
                outcome.attempts[peer_id] = Attempts(tally.requests, [*tally.failed, "timeout"])
                continue
            kind, reply, reason = future.result()
            if reply is not None:
                outcome.replies[peer_id] = reply
                outcome.arrived.setdefault(peer_id, time.monotonic())
                if kind == "silent":
                    outcome.silent.add(peer_id)
            elif kind == "rejected":
                outcome.rejected[peer_id] = reason
            else:
                outcome.missing[peer_id] = reason
        kept = [outcome.attempts[p].kept_at for p in outcome.replies]
        outcome.time_lost_s = max(0.0, ended - max([started, *(t for t in kept if t is not None)]))
        return outcome

    def pull(
        self,
        endpoint: Endpoint,
        round: int,
        deadline: float,
        first_contact_s: float | None = None,
        *,
        attempts: Attempts | None = None,
        max_staleness: int | None = None,
    ) -> tuple[str, Reply | None, str]:
        """Fetch one neighbour until it is at ``round`` or the deadline passes.

        With ``first_contact_s``, the neighbour must give a first answer (a state or a refusal)
        within that many seconds, else the pull ends then as a ``timeout``. ``attempts``, when
        given, counts the requests, the failed ones and when the reply kept arrived. With
        ``max_staleness`` K it is asked once: its state, whatever its round, is taken when it is
        at most K rounds behind ``round`` (else ``("missing", None, "too_stale")``), and a
        refusal ends the pull at once.

        Returns ``("fresh" | "stale", reply, "")``, ``("rejected", None, reason)`` or
        ``("missing", None, why)``; a stale reply is the newest one that came while it was behind,
        and ``("silent", reply, "timeout")`` says it stopped answering after it (``SILENT_S``).
        """
        tally = Attempts() if attempts is None else attempts
        stale: Reply | None = None
        why = "timeout"
        delay = POLL_FIRST_S
        until = deadline
        if first_contact_s is not None:
            until = min(deadline, time.monotonic() + first_contact_s)
        while not self.stop.is_set():
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            if self.replicas is not None:
                endpoint = replace(endpoint, base=self.replicas.base(endpoint.peer_id))
            tally.requests += 1
            try:
                asked = time.monotonic()
                reply = self.transport.fetch(
                    endpoint, round=round, timeout=remaining, like_state=self.like
                )
            except MessageError as exc:  # the transport counted and logged it
                tally.failed.append(f"rejected:{exc.reason}")
                return "rejected", None, exc.reason
            except PeerRefusedError as exc:  # e.g. not_ready: it has not trained a round yet
                tally.failed.append(exc.kind)
                if exc.kind == "refused:gone":  # it is leaving the swarm: wait no longer
                    return "missing", stale, exc.kind
                why, until = exc.kind, deadline
                if max_staleness is not None:
                    break
            except NetworkError as exc:  # timeout, or the transport is closing
                kind = getattr(exc, "kind", "unreachable")
                tally.failed.append(kind)
                if stale is None:
                    return "missing", None, kind
                silent = kind == "timeout" and time.monotonic() - asked >= SILENT_S
                return ("silent", stale, kind) if silent else ("stale", stale, "")
            else:
                try:
                    self.verifier.verify(reply.header, self.keys.get(endpoint.peer_id))
                    if self.replicas is not None:
                        state = self.replicas.receive(endpoint.peer_id, reply)
                        reply = replace(reply, state=state)
                    if self.receive_hook is not None:
                        self.receive_hook(reply)
                except MessageError as exc:
                    self.transport.stats.record_rejection(endpoint.peer_id, exc.reason)
                    log.warning("rejected the state of peer %s: %s", endpoint.peer_id, exc)
                    tally.failed.append(f"rejected:{exc.reason}")
                    return "rejected", None, exc.reason
                tally.kept_at = time.monotonic()
                if reply.header.round >= round:
                    return "fresh", reply, ""
                if max_staleness is not None:
                    if round - reply.header.round > max_staleness:
                        return "missing", None, "too_stale"
                    return "stale", reply, ""
                stale, until = reply, deadline
                if self.replicas is None:  # polls say what they hold: no whole state again
                    endpoint = replace(endpoint, base=reply.header.round)
            if self.stop.wait(min(delay, max(0.0, until - time.monotonic()))):
                break
            delay = min(2 * delay, POLL_MAX_S)
        return ("stale", stale, "") if stale is not None else ("missing", None, why)
