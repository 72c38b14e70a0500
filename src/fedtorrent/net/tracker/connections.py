"""Connection hygiene for the tracker's listening socket: deadlines and a per-address cap.

aiohttp (pinned 3.14) already closes a connection that delivers no complete request within
``keepalive_timeout`` of opening or of its last answer; the tracker keeps that as a backstop. What
aiohttp lacks is done here, in a thin protocol wrapper around its ``RequestHandler``:

- a **header timeout**: from the first byte of a request until aiohttp hands the parsed head to the
  application, at most ``header_timeout`` seconds (a slowloris sending one byte a second is cut);
- an **idle timeout** that is counted: a connection with no request bytes for ``idle_timeout``
  seconds after opening or after its last answer is closed;
- a **cap on open connections per source address**: the next one is answered ``503`` with
  ``Retry-After: 1`` and closed at once;
- **counts** of each (``ConnectionGuard.counts``), for ``/metrics`` and ``/healthz``.

Bodies need no timeout: the tracker refuses any request that declares one (413) and closes.
The wrapper forwards every protocol event unchanged, so aiohttp sees the transport as its own.
A sweep every ``tick`` seconds applies the deadlines; the request path only flips two fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)
_IDLE, _HEAD, _BUSY = 0, 1, 2


class _Connection:
    __slots__ = ("address", "since", "state", "transport")

    def __init__(self, address: str, transport: asyncio.Transport, now: float) -> None:
        self.address, self.transport = address, transport
        self.state, self.since = _IDLE, now


class ConnectionGuard:
    """Deadlines and per-address caps for every connection of one listening socket.

    Args:
        header_timeout: seconds from a request's first byte until its head is parsed.
        idle_timeout: seconds without request bytes (after opening or after an answer).
        max_per_address: open connections per source address; 0 for no cap.
        normalize: maps a peer address to the form addresses are counted under.
        clock: monotonic seconds (tests may pass their own).
    """

    def __init__(
        self,
        *,
        header_timeout: float,
        idle_timeout: float,
        max_per_address: int,
        normalize: Callable[[str], str] = str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.header_timeout, self.idle_timeout = header_timeout, idle_timeout
        self.max_per_address = max_per_address
        self._normalize, self._clock = normalize, clock
        self.counts: Counter[str] = Counter()
        """``header_timeout``, ``idle_timeout``: connections cut; ``address_cap``: refused."""
        self.per_address: dict[str, int] = {}
        self._connections: dict[asyncio.BaseTransport, _Connection] = {}
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def open(self) -> int:
        """Connections open now."""
        return len(self._connections)

    @property
    def tick(self) -> float:
        """Seconds between sweeps: a deadline is applied at most this late."""
        return min(1.0, max(0.02, min(self.header_timeout, self.idle_timeout) / 10))

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], Any]:
        """Wrap aiohttp's protocol factory (the runner's ``server``) for ``create_server``."""
        return lambda: _GuardedProtocol(self, inner)

    def start(self) -> None:
        """Start the sweep on the running loop."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        """Stop the sweep (connections are closed by aiohttp's shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        """A request head reached the application: its deadline no longer applies."""
        connection = self._connections.get(transport) if transport is not None else None
        if connection is not None:
            connection.state = _BUSY

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        """The answer is written: the connection is idle again from now."""
        connection = self._connections.get(transport) if transport is not None else None
        if connection is not None:
            connection.state, connection.since = _IDLE, self._clock()

    def _admit(self, transport: asyncio.Transport) -> _Connection | None:
        peer = transport.get_extra_info("peername")
        try:
            address = self._normalize(peer[0]) if peer else ""
        except ValueError:
            address = str(peer[0])
        held = self.per_address.get(address, 0)
        if self.max_per_address and held >= self.max_per_address:
            self.counts["address_cap"] += 1
            body = b'{"failure reason": "too many connections from this address"}'
            transport.write(_REFUSED % (len(body), body))
            transport.close()
            return None
        self.per_address[address] = held + 1
        connection = self._connections[transport] = _Connection(address, transport, self._clock())
        return connection

    def _closed(self, connection: _Connection) -> None:
        if self._connections.pop(connection.transport, None) is None:
            return
        left = self.per_address[connection.address] - 1
        if left:
            self.per_address[connection.address] = left
        else:
            del self.per_address[connection.address]

    def sweep(self) -> int:
        """Close every connection past its deadline; returns how many were closed."""
        now = self._clock()
        head_cutoff, idle_cutoff = now - self.header_timeout, now - self.idle_timeout
        late = [
            c
            for c in self._connections.values()
            if (c.state == _HEAD and c.since < head_cutoff)
            or (c.state == _IDLE and c.since < idle_cutoff)
        ]
        for connection in late:
            reason = "header_timeout" if connection.state == _HEAD else "idle_timeout"
            self.counts[reason] += 1
            connection.state = _BUSY  # counted once, whatever the close takes
            connection.transport.abort()
        return len(late)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self.sweep()


class _GuardedProtocol(asyncio.Protocol):
    """Forwards every event to aiohttp's handler, noting when request bytes arrive."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard, self._factory = guard, factory
        self._inner: asyncio.Protocol | None = None
        self._connection: _Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._connection = self._guard._admit(transport)
        if self._connection is not None:
            self._inner = self._factory()
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        connection = self._connection
        if connection is not None and connection.state == _IDLE:
            connection.state, connection.since = _HEAD, self._guard._clock()
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._connection is not None:
            self._guard._closed(self._connection)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
