"""The real transport: one ROUTER socket serves this peer's state; one DEALER per fetch pulls.

On the wire a reply is a header message followed by the payload in pieces, each its own ZeroMQ
message. ZeroMQ delivers a multipart message only once all of it has arrived, so one big frame
would leave the receiver idle during the transfer and then hashing; separate pieces let it hash
piece k while piece k+1 is on the wire. Pieces are zero-copy views of the published payload, so
serving many peers costs no memory per peer. Requests and headers are capped at the ZeroMQ level
(``MAXMSGSIZE``) as well as in ``wire``.

Each fetch uses its own DEALER socket, closed (linger 0) when the fetch ends, so nothing from a
timed-out exchange can leak into the next one. A transport without keys of its own fetches from
CurveZMQ servers with one ephemeral key pair, made at its first such fetch. ZeroMQ hides a refused
connection (it retries quietly), so each fetch also watches its socket's monitor events: a
connection refused before a reply came, or a failed CurveZMQ handshake, ends the fetch at once as
``PeerUnreachableError`` instead of costing it the whole deadline (on loopback that takes well
under a millisecond; the monitor adds about 0.1 ms to a fetch). The server thread owns the ROUTER;
it never blocks on a peer (``ROUTER_MANDATORY`` with non-blocking sends: a reply that cannot be
queued is dropped and counted as ``dropped``).

With CurveZMQ on, the same server thread answers the context's ZAP requests (RFC 27): every
handshake's client key is admitted when ``curve_allow`` is None (an open swarm) or holds it (a
closed swarm), and refused otherwise, counted as a ``not_allowed`` rejection. A refused client
never gets a byte of application data; to it the fetch looks like a silent peer. The admitted key
(ZeroMQ's ``User-Id``) and the connection's ROUTER id are what requests are rate-limited by.

A TCP transport also binds a plain (unencrypted) ROUTER on the same host and a free port, the
hello socket (``hello_port``): it answers only ``hello_request`` with the peer's signed hello,
so a peer that found this one through a standard BitTorrent tracker (addresses, no keys) learns
the key its CurveZMQ link needs. The same server thread serves it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import zmq
from zmq.utils import z85

from fedtorrent.errors import NetworkError
from fedtorrent.net import wire
from fedtorrent.net.transport.base import (
    UNKNOWN,
    Endpoint,
    FetchTimeoutError,
    PeerUnreachableError,
    Reply,
    Served,
    Transport,
    TransportConfig,
    child_thread_name,
)

log = logging.getLogger(__name__)
MAX_PIECES = 1024
"""A payload is cut into at most this many pieces (fewer, larger ones for big models)."""
_POLL_SLICE_S = 0.1
"""Fetches wake this often to notice ``close``."""
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
"""Where libzmq asks a context's authentication handler (fixed by RFC 27)."""
ZAP_DOMAIN = b"fedtorrent"
_LINK_EVENTS: dict[int, str] = {
    zmq.EVENT_CONNECT_RETRIED: "unreachable",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed",
}
"""Monitor events that end a fetch before its reply, and the failure kind each one means."""
_Bytes = np.ndarray[Any, np.dtype[np.uint8]]


class ZmqTransport(Transport):
    """ZeroMQ over TCP (or ``ipc://``); optionally CurveZMQ-encrypted."""

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        self._context: zmq.Context[Any] | None = None
        self._thread: threading.Thread | None = None
        self._wake: zmq.Socket[Any] | None = None
        self._address = ""
        self._hello_port: int | None = None
        self._cut: tuple[Served, tuple[zmq.Frame, ...]] | None = None
        self._buffers = BufferPool(keep=config.max_concurrent_fetches)
        self._keys_lock = threading.Lock()
        self._ephemeral: tuple[bytes, bytes] | None = None

    @property
    def address(self) -> str:
        """The bound endpoint, e.g. ``tcp://127.0.0.1:40123``."""
        if not self._address:
            raise NetworkError("transport not started")
        return self._address

    @property
    def hello_port(self) -> int | None:
        """The hello socket's port (TCP binds; valid after ``start``), else None."""
        return self._hello_port

    def _start(self) -> None:
        context: zmq.Context[Any] = zmq.Context(io_threads=1)
        zap: zmq.Socket[Any] | None = None
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, wire.MAX_HEADER_BYTES)
        router.setsockopt(zmq.SNDHWM, 4 * (MAX_PIECES + 1))
        if self.config.curve_secret_key is not None:
            # The handler must exist before the first handshake, so before bind.
            zap = context.socket(zmq.REP)
            zap.setsockopt(zmq.LINGER, 0)
            zap.bind(ZAP_ENDPOINT)
            router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
            router.setsockopt(zmq.CURVE_SERVER, 1)
            router.setsockopt(zmq.CURVE_SECRETKEY, self.config.curve_secret_key)
            router.setsockopt(zmq.CURVE_PUBLICKEY, self.config.curve_public_key)
        try:
            router.bind(self.config.bind)
        except zmq.ZMQError as exc:
            router.close(linger=0)
            if zap is not None:
                zap.close(linger=0)
            context.term()
            raise NetworkError(f"cannot bind {self.config.bind}: {exc}") from None
        self._address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        hello = self._bind_hello(context)
        wake_name = f"inproc://fedtorrent-wake-{id(self)}"
        wake_rx = context.socket(zmq.PAIR)
        wake_rx.bind(wake_name)
        self._wake = context.socket(zmq.PAIR)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.connect(wake_name)
        self._context = context
        self._thread = threading.Thread(
            target=self._serve,
            args=(router, wake_rx, zap, hello),
            name=child_thread_name("serve"),
            daemon=True,
        )
        self._thread.start()

    def _bind_hello(self, context: zmq.Context[Any]) -> zmq.Socket[Any] | None:
        """The plain hello ROUTER on the data socket's host and a free port (TCP only)."""
        if not self._address.startswith("tcp://"):
            return None
        host = self._address[len("tcp://") :].rsplit(":", 1)[0]
        hello: zmq.Socket[Any] = context.socket(zmq.ROUTER)
        hello.setsockopt(zmq.LINGER, 0)
        hello.setsockopt(zmq.ROUTER_MANDATORY, 1)
        hello.setsockopt(zmq.MAXMSGSIZE, wire.MAX_HEADER_BYTES)
        if host.startswith("["):
            hello.setsockopt(zmq.IPV6, 1)
        try:
            hello.bind(f"tcp://{host}:0")
        except zmq.ZMQError as exc:  # the data socket is up: serve without hellos
            log.warning("no hello socket on %s: %s", host, exc)
            hello.close(linger=0)
            return None
        self._hello_port = int(hello.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        return hello

    def _close(self) -> None:
        if self._wake is not None:
            self._wake.send(b"")
        if self._thread is not None:
            self._thread.join()
        if self._wake is not None:
            self._wake.close(linger=0)
        if self._context is not None:
            self._context.term()  # fetch sockets close within _POLL_SLICE_S of _closing

    # -- server ---------------------------------------------------------------------------------

    def _on_publish(self, served: Served) -> None:
        payload = memoryview(served.frames[1])
        size = max(self.config.piece_bytes, math.ceil(len(payload) / MAX_PIECES))
        pieces = tuple(
            zmq.Frame(payload[i : i + size], copy=False) for i in range(0, len(payload), size)
        )
        self._cut = (served, pieces)

    def _pieces(self, served: Served) -> tuple[zmq.Frame, ...]:
        cut = self._cut
        if cut is None or cut[0] is not served:  # published again meanwhile: cut this one
            self._on_publish(served)
            cut = self._cut
        assert cut is not None
        return cut[1]

    def _serve(
        self,
        router: zmq.Socket[Any],
        wake: zmq.Socket[Any],
        zap: zmq.Socket[Any] | None,
        hello: zmq.Socket[Any] | None,
    ) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        for optional in (zap, hello):
            if optional is not None:
                poller.register(optional, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if wake in events:
                    return
                if zap is not None and zap in events:
                    self._authenticate(zap)
                if hello is not None and hello in events:
                    self._introduce_to(hello)
                while True:
                    try:
                        frames = router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        self._handle(router, frames, curve=zap is not None)
                    except Exception:  # one bad exchange must not stop this peer serving
                        log.exception("serving a request failed")
        finally:
            router.close(linger=0)
            wake.close(linger=0)
            for optional in (zap, hello):
                if optional is not None:
                    optional.close(linger=0)

    def _authenticate(self, zap: zmq.Socket[Any]) -> None:
        """Answer one ZAP request: admit a CurveZMQ client key that the swarm allows."""
        frames = zap.recv_multipart()
        request_id = frames[1] if len(frames) > 1 else b""
        status, text, user = b"400", b"malformed ZAP request", b""
        if len(frames) == 7 and frames[0] == b"1.0" and frames[5] == b"CURVE":
            key = bytes(z85.encode(frames[6])) if len(frames[6]) == 32 else b""
            allow = self.config.curve_allow
            if key and (allow is None or key in allow):
                status, text, user = b"200", b"OK", key
            else:
                status, text = b"400", b"key not allowed in this swarm"
                label = f"curve:{key.decode('ascii')}" if key else UNKNOWN
                self.stats.record_rejection(label, "not_allowed")
                log.info("refused a handshake from CurveZMQ key %s", label)
        zap.send_multipart([b"1.0", request_id, status, text, user, b""])

    def _introduce_to(self, hello: zmq.Socket[Any]) -> None:
        """Answer every queued hello request (never blocking: a full queue drops the answer)."""
        while True:
            try:
                frames = hello.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = frames[0]
            answer = self.answer_hello(frames[1:], connection=f"hello:{identity.hex()}")
            try:
                hello.send_multipart([identity, *answer], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                self.stats.record_failure(UNKNOWN, "dropped")

    def _handle(self, router: zmq.Socket[Any], frames: list[zmq.Frame], *, curve: bool) -> None:
        """Answer one request; the link's CurveZMQ key and its ROUTER id name it for limits."""
        identity, request = frames[0].bytes, [f.bytes for f in frames[1:]]
        client_key = None
        if curve and len(frames) > 1:
            client_key = str(frames[1].get("User-Id"))  # what _authenticate admitted
        served, error, requester = self.answer(
            request, client_key=client_key, connection=identity.hex()
        )
        try:
            if served is None:
                router.send_multipart([identity, *error], flags=zmq.NOBLOCK)
                return
            router.send_multipart([identity, served.frames[0]], flags=zmq.NOBLOCK)
            for piece in self._pieces(served):
                router.send_multipart([identity, piece], copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # EAGAIN (queue full) or EHOSTUNREACH (peer gone)
            self.stats.record_failure(UNKNOWN, "dropped")
            return
        self.report_served(requester, served)

    # -- client ---------------------------------------------------------------------------------

    @contextmanager
    def _dealer(self) -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
        """A fresh DEALER and its link monitor for one exchange; both closed afterwards."""
        if self._context is None:
            raise NetworkError("transport not started")
        try:
            sock = self._context.socket(zmq.DEALER)
        except zmq.ZMQError as exc:
            raise NetworkError(f"transport closing: {exc}") from None
        monitor: zmq.Socket[Any] | None = None
        try:
            monitor = sock.get_monitor_socket(sum(_LINK_EVENTS))
            yield sock, monitor
        finally:
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(linger=0)
            sock.close(linger=0)

    def _fetch(self, endpoint: Endpoint, round: int, deadline: float) -> Reply:
        header_bytes = payload_bytes = 0
        try:
            with self._dealer() as (sock, monitor):
                self._configure_client(sock, endpoint)
                request = wire.encode_request(
                    info_hash=self.config.info_hash,
                    sender=self.config.peer_id,
                    round=round,
                    base=endpoint.base,
                )
                started = time.perf_counter()
                sock.send_multipart(request, flags=zmq.NOBLOCK)
                self.stats.record_sent(endpoint.peer_id, round, header=len(request[0]))

                head = memoryview(bytearray(wire.MAX_HEADER_BYTES + 1))
                header_bytes = self._receive_into(sock, head, endpoint, deadline, monitor)
                if header_bytes > wire.MAX_HEADER_BYTES:
                    raise wire.reject("oversized", f"reply header of {header_bytes} bytes")
                if sock.getsockopt(zmq.RCVMORE):
                    raise wire.reject("bad_frames", "reply header came with extra frames")
                header = self.check_reply_header(endpoint, head[:header_bytes])

                # Size checked by the header. Each piece is copied in, then hashed and scanned for
                # NaN while it is still in this core's cache (hashing data another core just wrote
                # runs at 60% of that speed here).
                payload = memoryview(self._buffers.take(header.payload_len).data)
                digest, scan = hashlib.sha256(), wire.FiniteScan(payload)
                while payload_bytes < len(payload):
                    space = len(payload) - payload_bytes
                    got = self._receive_into(sock, payload[payload_bytes:], endpoint, deadline)
                    if got == 0 or got > space or sock.getsockopt(zmq.RCVMORE):
                        raise wire.reject(
                            "bad_frames", "payload pieces do not add up to its length"
                        )
                    digest.update(payload[payload_bytes : payload_bytes + got])  # frees the GIL
                    payload_bytes += got
                    scan.feed(payload_bytes)
                rtt = time.perf_counter() - started
                wire.verify_payload(header, payload, computed_sha256=digest.hexdigest())
                return Reply(
                    peer_id=endpoint.peer_id,
                    header=header,
                    payload=payload,
                    rtt_s=rtt,
                    finite=scan.cleared(),
                )
        except zmq.ZMQError as exc:
            raise NetworkError(f"exchange with {endpoint.peer_id} failed: {exc}") from None
        finally:
            if header_bytes:
                self.stats.record_received(
                    endpoint.peer_id,
                    round,
                    header=min(header_bytes, wire.MAX_HEADER_BYTES),
                    payload=payload_bytes,
                )

    def _hello_exchange(self, address: str, request: list[bytes], deadline: float) -> list[bytes]:
        """One plain DEALER to ``address``: send the request, take one answer (header-sized)."""
        endpoint = Endpoint(peer_id=address, address=address)
        try:
            with self._dealer() as (sock, monitor):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_HEADER_BYTES)
                try:
                    sock.connect(address)
                except zmq.ZMQError as exc:
                    raise NetworkError(f"bad address {address!r}: {exc}") from None
                sock.send_multipart(request, flags=zmq.NOBLOCK)
                head = memoryview(bytearray(wire.MAX_HEADER_BYTES + 1))
                size = self._receive_into(sock, head, endpoint, deadline, monitor)
                if size > wire.MAX_HEADER_BYTES:
                    raise wire.reject("oversized", f"hello of {size} bytes")
                if sock.getsockopt(zmq.RCVMORE):
                    raise wire.reject("bad_frames", "a hello came with extra frames")
                return [bytes(head[:size])]
        except zmq.ZMQError as exc:
            raise NetworkError(f"hello from {address} failed: {exc}") from None

    def _configure_client(self, sock: zmq.Socket[Any], endpoint: Endpoint) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_payload_bytes + wire.MAX_HEADER_BYTES)
        if endpoint.public_key is not None:
            public, secret = self.config.curve_public_key, self.config.curve_secret_key
            if public is None or secret is None:
                public, secret = self._client_keys()
            sock.setsockopt(zmq.CURVE_SERVERKEY, endpoint.public_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        try:
            sock.connect(endpoint.address)
        except zmq.ZMQError as exc:
            raise NetworkError(f"bad address {endpoint.address!r}: {exc}") from None

    def _client_keys(self) -> tuple[bytes, bytes]:
        """One ephemeral CurveZMQ key pair for all of this transport's fetches (made once)."""
        with self._keys_lock:
            if self._ephemeral is None:
                self._ephemeral = zmq.curve_keypair()
            return self._ephemeral

    def _receive_into(
        self,
        sock: zmq.Socket[Any],
        buffer: memoryview,
        endpoint: Endpoint,
        deadline: float,
        monitor: zmq.Socket[Any] | None = None,
    ) -> int:
        """Copy the next frame in, waiting (in short slices, to notice ``close``) if none is here.

        While a payload streams in, the next piece is usually queued already: taking it without
        polling first saves a system call per piece. With ``monitor`` (the socket's monitor,
        watched until the reply header came) a refused connection or failed handshake raises
        ``PeerUnreachableError`` at once.
        """
        poller: zmq.Poller | None = None  # made on the first wait: most pieces are queued already
        while True:
            if self._closing.is_set():
                raise NetworkError("transport closed")
            try:
                return int(sock.recv_into(buffer, flags=zmq.NOBLOCK))
            except zmq.Again:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchTimeoutError(f"peer {endpoint.peer_id} did not answer in time")
            if poller is None:
                poller = zmq.Poller()
                poller.register(sock, zmq.POLLIN)
                if monitor is not None:
                    poller.register(monitor, zmq.POLLIN)
            events = dict(poller.poll(math.ceil(min(remaining, _POLL_SLICE_S) * 1000)))
            if monitor is not None and monitor in events:
                _raise_on_link_failure(monitor, endpoint)


def _raise_on_link_failure(monitor: zmq.Socket[Any], endpoint: Endpoint) -> None:
    """Read the queued monitor events; raise ``PeerUnreachableError`` on a failed link."""
    from zmq.utils.monitor import parse_monitor_message  # noqa: PLC0415

    while True:
        try:
            frames = monitor.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        kind = _LINK_EVENTS.get(int(parse_monitor_message(frames)["event"]))
        if kind is not None:
            raise PeerUnreachableError(endpoint.peer_id, kind)


class BufferPool:
    """Receive buffers, handed out again once nothing refers to them any more.

    A fresh 100 MB buffer costs about 10 ms of page faults and kernel zeroing on its first write,
    a tenth of a loopback fetch. The pool hands out a fresh numpy view of a buffer it keeps and
    holds only a weak reference to that view; everything made from a reply (its payload, the
    tensors decoded from it) keeps the view alive, so the buffer is free exactly when the weak
    reference is dead, without asking callers to give anything back. The pool forgets its oldest
    buffers beyond ``keep`` (one still in use stays alive for its user and is freed with it); the
    transport keeps as many as fetches can run at once, what one round of a cohort needs.
    """

    def __init__(self, keep: int = 8) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._slots: list[tuple[_Bytes, weakref.ref[_Bytes]]] = []

    def take(self, size: int) -> _Bytes:
        """A buffer of ``size`` bytes (uninitialised), reused when one of that size is free."""
        with self._lock:  # under the lock no other fetch can take the buffer found free
            for index, (base, handed) in enumerate(self._slots):
                if base.size == size and handed() is None:
                    view = base[:]
                    self._slots[index] = (base, weakref.ref(view))
                    return view
            base = np.empty(size, dtype=np.uint8)  # unlike bytearray, not zeroed by Python
            view = base[:]
            self._slots.append((base, weakref.ref(view)))
            del self._slots[: -self._keep]
            return view
