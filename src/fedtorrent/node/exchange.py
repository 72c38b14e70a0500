"""How a peer finds and fetches its cohort: tracker and address contracts, cohort selection, pulls.

Each neighbour is pulled on its own thread until the round's deadline, re-asked with backoff
while it is behind, and every reply is verified (signature, replay guard, receive hook) before
anything else looks at it; nobody waits on anybody else (no barrier).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from fedtorrent.errors import FedTorrentError, MessageError, NetworkError

if TYPE_CHECKING:
    import torch

    from fedtorrent.net.identity import UpdateVerifier
    from fedtorrent.net.tracker.client import PeerAddress, TrackerAnswer
    from fedtorrent.net.transport import Endpoint, Reply, Transport

log = logging.getLogger(__name__)
ReceiveHook = Callable[["Reply"], None]
"""Called on every reply that passed the wire checks; raise ``MessageError`` to reject it."""
POLL_FIRST_S = 0.02
POLL_MAX_S = 0.5
"""Backoff between re-asking a neighbour that is not yet at this peer's round."""


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
    ) -> TrackerAnswer:
        """Announce and return a sample of other peers (raise ``TrackerError`` when down)."""


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
        from fedtorrent.net.transport import Endpoint  # noqa: PLC0415

        host = f"[{peer.ip}]" if ":" in peer.ip else peer.ip
        return Endpoint(peer_id=peer.peer_id, address=f"tcp://{host}:{peer.port}")


@dataclass
class Exchange:
    """What one round's exchange produced; every cohort member is in exactly one of the dicts."""

    replies: dict[str, Reply] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    """Peer id -> rejection reason (a ``wire.REASONS`` code)."""
    missing: dict[str, str] = field(default_factory=dict)
    """Peer id -> why nothing usable came (``timeout``, ``refused:not_ready``, ...)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Peers the tracker listed but this peer would not dial: ``no_key`` (announced no usable
    Ed25519 key) or ``not_allowed`` (outside a closed swarm's allow-list). Not in the cohort."""


def select_cohort(
    answer: TrackerAnswer,
    *,
    peer_id: str,
    cohort_size: int,
    allowed: Sequence[str],
    addressing: Addressing,
) -> tuple[list[Endpoint], dict[str, str], dict[str, str]]:
    """The first ``cohort_size`` listed peers this peer may dial, each with its link key.

    Peers without a usable key, or outside a closed swarm's allow-list (when ``allowed`` is not
    empty), are skipped.

    Returns:
        The cohort's endpoints; peer id -> why it was skipped (``no_key``, ``not_allowed``); and
        peer id -> the Ed25519 key (hex) each cohort member announced.
    """
    from fedtorrent.net.identity import curve_public_key  # noqa: PLC0415
    from fedtorrent.net.torrent import is_info_hash  # noqa: PLC0415 (64 lowercase hex)

    cohort: list[Endpoint] = []
    skipped: dict[str, str] = {}
    keys: dict[str, str] = {}
    for peer in answer.peers:
        if peer.peer_id == peer_id or len(cohort) >= cohort_size:
            continue
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
            log.warning("cannot reach peer %s as listed: %s", peer.peer_id, exc)
            continue
        keys[peer.peer_id] = key
        cohort.append(endpoint)
    return cohort, skipped, keys


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

    def exchange(
        self,
        cohort: Sequence[Endpoint],
        *,
        round: int,
        deadline: float,
        skipped: Mapping[str, str],
    ) -> Exchange:
        """Pull every cohort member's state concurrently, each on its own until ``deadline``.

        Members never wait on each other: a silent one costs its own fetch the deadline, while
        the others are asked again (with backoff) as long as they are behind ``round``.
        """
        outcome = Exchange(skipped=dict(skipped))
        if not cohort:
            return outcome
        futures = {self.executor.submit(self.pull, e, round, deadline): e.peer_id for e in cohort}
        pending = set(futures)
        while pending and not self.stop.is_set():
            remaining = deadline - time.monotonic() + POLL_MAX_S  # fetches end at the deadline
            if remaining <= 0:
                break
            _, pending = wait(pending, timeout=min(remaining, POLL_MAX_S))
        for future, peer_id in futures.items():
            if not future.done():
                outcome.missing[peer_id] = "timeout"
                continue
            kind, reply, reason = future.result()
            if reply is not None:
                outcome.replies[peer_id] = reply
            elif kind == "rejected":
                outcome.rejected[peer_id] = reason
            else:
                outcome.missing[peer_id] = reason
        return outcome

    def pull(
        self, endpoint: Endpoint, round: int, deadline: float
    ) -> tuple[str, Reply | None, str]:
        """Fetch one neighbour until it is at ``round`` or the deadline passes.

        Returns ``("fresh" | "stale", reply, "")``, ``("rejected", None, reason)`` or
        ``("missing", None, why)``; a stale reply is the newest one that came while it was behind.
        """
        from fedtorrent.net.transport import PeerRefusedError  # noqa: PLC0415

        stale: Reply | None = None
        why = "timeout"
        delay = POLL_FIRST_S
        while not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                reply = self.transport.fetch(
                    endpoint, round=round, timeout=remaining, like_state=self.like
                )
            except MessageError as exc:  # the transport counted and logged it
                return "rejected", None, exc.reason
            except PeerRefusedError as exc:  # e.g. not_ready: it has not trained a round yet
                why = exc.kind
            except NetworkError as exc:  # timeout, or the transport is closing
                return "missing", stale, getattr(exc, "kind", "unreachable")
            else:
                try:
                    self.verifier.verify(reply.header, self.keys.get(endpoint.peer_id))
                    if self.receive_hook is not None:
                        self.receive_hook(reply)
                except MessageError as exc:
                    self.transport.stats.record_rejection(endpoint.peer_id, exc.reason)
                    log.warning("rejected the state of peer %s: %s", endpoint.peer_id, exc)
                    return "rejected", None, exc.reason
                if reply.header.round >= round:
                    return "fresh", reply, ""
                stale = reply
            if self.stop.wait(min(delay, max(0.0, deadline - time.monotonic()))):
                break
            delay = min(2 * delay, POLL_MAX_S)
        return ("stale", stale, "") if stale is not None else ("missing", None, why)
