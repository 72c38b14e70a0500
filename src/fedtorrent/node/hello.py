"""Peers a standard BitTorrent tracker listed by address: ask each for its hello, once.

Such a tracker lists ``ip:port`` pairs, the port being each peer's hello socket. Before the cohort
is chosen, every address not met before is asked for its hello (concurrently, within
``HELLO_TIMEOUT_S``); a hello that verifies (its signature by the key it carries, this session)
turns the address into a peer id, an Ed25519 key and a data port, exactly what our tracker lists,
and cohort selection then treats that key like an announced one (the allow-list applies).

Trust on first use: the first key a peer id introduces itself with is the one it keeps; a later
hello naming another key for it is refused (``key_changed``, counted as a rejection) and that
address stays unknown. Nothing proves the first hello came from the peer the swarm knows by that id
(our tracker's signed key bindings do not exist here); in a closed swarm the torrent's allow-list
still decides who is dialled. An address that failed is asked again after ``RETRY_S``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fedtorrent.errors import MessageError, NetworkError
from fedtorrent.net.identity import PeerIdentity, signed_hello, verify_hello
from fedtorrent.net.tracker.client import PeerAddress, TrackerAnswer
from fedtorrent.net.transport import Transport, child_thread_name

log = logging.getLogger(__name__)
HELLO_TIMEOUT_S = 2.0
"""Seconds one hello may take (a hello is two small messages on one connection)."""
RETRY_S = 10.0
"""Seconds before an address whose hello failed is asked again."""
MAX_KNOWN = 4096
"""Addresses remembered; past this the oldest are forgotten (and asked again if listed)."""
MAX_PARALLEL = 16


@dataclass(frozen=True)
class _Failed:
    until: float
    why: str


def introduce(
    transport: Transport, identity: PeerIdentity, *, info_hash: str, peer_id: str, port: int
) -> Introductions:
    """Serve this node's signed hello (data ``port``) on a started transport; its resolver.

    A transport without a hello socket (``hello_port`` None) serves none; the resolver still
    works for it (every hello it asks then fails).
    """
    if transport.hello_port is not None:
        transport.introduce(signed_hello(identity, info_hash=info_hash, peer_id=peer_id, port=port))
    return Introductions(transport)


class Introductions:
    """What this peer learned from hellos: address -> peer, and peer id -> its first key.

    Thread-safe; ``resolve`` is called from the round loop (and a refill) of one peer.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        timeout: float = HELLO_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._known: dict[tuple[str, int], PeerAddress] = {}
        self._failed: dict[tuple[str, int], _Failed] = {}
        self.keys: dict[str, str] = {}
        """Peer id -> the key (hex) it first introduced itself with."""
        self.counts: Counter[str] = Counter()
        """Hellos by outcome: ``learned``, ``failed``, ``key_changed``."""

    def listed(self, answer: TrackerAnswer) -> tuple[PeerAddress, ...]:
        """The answer's peers as our tracker would list them (a BitTorrent answer resolved).

        Our tracker's answers pass unchanged. Addresses that gave no good hello stay as listed
        (an ``ip:port`` id and no key), so cohort selection skips them as ``no_key``.
        """
        if answer.flavour != "bittorrent":
            return answer.peers
        now = self._clock()
        with self._lock:
            unknown = [
                (p.ip, p.port)
                for p in answer.peers
                if (p.ip, p.port) not in self._known
                and self._failed.get((p.ip, p.port), _Failed(now, "")).until <= now
            ]
        if unknown:
            with ThreadPoolExecutor(
                min(MAX_PARALLEL, len(unknown)), thread_name_prefix=child_thread_name("hello")
            ) as pool:
                list(pool.map(self._ask, unknown))
        with self._lock:
            return tuple(self._known.get((p.ip, p.port), p) for p in answer.peers)

    def _ask(self, where: tuple[str, int]) -> None:
        ip, port = where
        host = f"[{ip}]" if ":" in ip else ip
        address = f"tcp://{host}:{port}"
        try:
            header = self.transport.hello(address, timeout=self.timeout)
            key = verify_hello(header)
        except MessageError as exc:
            if exc.reason == "bad_signature":
                self.transport.stats.record_rejection(address, exc.reason)
            self._fail(where, exc.reason, f"hello from {address} rejected: {exc}")
            return
        except NetworkError as exc:
            why = getattr(exc, "kind", "unreachable")
            self._fail(where, why, f"no hello from {address}: {exc}")
            return
        peer = PeerAddress(peer_id=header.sender, ip=ip, port=header.port, pubkey=key)
        with self._lock:
            first = self.keys.setdefault(peer.peer_id, key)
            if first == key:
                self._known[where] = peer
                self._failed.pop(where, None)
                while len(self._known) > MAX_KNOWN:
                    del self._known[next(iter(self._known))]
                self.counts["learned"] += 1
                return
        self.transport.stats.record_rejection(peer.peer_id, "key_changed")
        self._fail(where, "key_changed", f"{address} says it is {peer.peer_id!r} with another key")

    def _fail(self, where: tuple[str, int], why: str, text: str) -> None:
        log.info("%s", text)
        with self._lock:
            self._failed[where] = _Failed(self._clock() + RETRY_S, why)
            while len(self._failed) > MAX_KNOWN:
                del self._failed[next(iter(self._failed))]
            self.counts["key_changed" if why == "key_changed" else "failed"] += 1
