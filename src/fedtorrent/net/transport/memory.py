"""The in-memory twin of the ZeroMQ transport: same contract, same checks, same accounting.

Peers live in one process and reach each other through a ``MemoryNetwork``. A fetch from an
unknown or silenced address waits out its timeout, as a request to a dead ZeroMQ peer does, so
deadline logic can be tested without sockets. ``add_raw_peer`` plants a peer that answers with
arbitrary frames, for testing how bad replies are rejected.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from fedtorrent.errors import NetworkError
from fedtorrent.net import wire
from fedtorrent.net.transport.base import (
    Endpoint,
    FetchTimeoutError,
    Reply,
    Transport,
    TransportConfig,
)

Responder = Callable[[list[bytes]], Sequence[bytes]]
"""Takes request frames, returns reply frames (``[header]`` or ``[header, payload]``)."""


class MemoryNetwork:
    """A hub that routes requests between in-process peers by address (``mem://N``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, Responder] = {}
        self._silent: set[str] = set()
        self._next = 0

    def add_raw_peer(self, address: str, respond: Responder) -> None:
        """Route ``address`` to ``respond``: a stand-in for a buggy or malicious peer."""
        with self._lock:
            self._routes[address] = respond

    def silence(self, address: str) -> None:
        """Make ``address`` stop answering, like a peer killed mid-run; fetches then time out."""
        with self._lock:
            self._silent.add(address)

    def _register(self, respond: Responder) -> str:
        with self._lock:
            address = f"mem://{self._next}"
            self._next += 1
            self._routes[address] = respond
            return address

    def _unregister(self, address: str) -> None:
        with self._lock:
            self._routes.pop(address, None)

    def _route(self, address: str) -> Responder | None:
        with self._lock:
            return None if address in self._silent else self._routes.get(address)


class MemoryTransport(Transport):
    """A transport whose peers are other ``MemoryTransport`` objects on the same network."""

    def __init__(self, network: MemoryNetwork, config: TransportConfig) -> None:
        super().__init__(config)
        self.network = network
        self._address = ""

    @property
    def address(self) -> str:
        """``mem://N``, assigned by the network at ``start``."""
        if not self._address:
            raise NetworkError("transport not started")
        return self._address

    def _start(self) -> None:
        self._address = self.network._register(self._respond)

    def _close(self) -> None:
        self.network._unregister(self._address)

    def _respond(self, request: list[bytes]) -> list[bytes]:
        served, error, requester = self.answer(request)
        if served is None:
            return error
        self.report_served(requester, served)
        return list(served.frames)

    def _fetch(self, endpoint: Endpoint, round: int, deadline: float) -> Reply:
        request = wire.encode_request(
            info_hash=self.config.info_hash,
            sender=self.config.peer_id,
            round=round,
            base=endpoint.base,
        )
        started = time.perf_counter()
        self.stats.record_sent(endpoint.peer_id, round, header=len(request[0]))
        respond = self.network._route(endpoint.address)
        if respond is None:
            if self._closing.wait(max(0.0, deadline - time.monotonic())):
                raise NetworkError("transport closed")
            raise FetchTimeoutError(f"peer {endpoint.peer_id} did not answer in time")
        frames = list(respond(list(request)))
        header_bytes = len(frames[0]) if frames else 0
        payload_bytes = sum(len(f) for f in frames[1:])
        self.stats.record_received(
            endpoint.peer_id, round, header=header_bytes, payload=payload_bytes
        )
        if not 1 <= len(frames) <= 2:
            raise wire.reject("bad_frames", f"a reply has 1 or 2 frames, got {len(frames)}")
        header = self.check_reply_header(endpoint, wire.as_buffer(frames[0]))
        if len(frames) != 2:
            raise wire.reject("bad_frames", "a state reply needs a payload frame")
        payload = wire.as_buffer(frames[1])
        wire.verify_payload(header, payload)
        return Reply(
            peer_id=endpoint.peer_id,
            header=header,
            payload=payload,
            rtt_s=time.perf_counter() - started,
        )
