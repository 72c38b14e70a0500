"""HTTP(S) GET with a total deadline and a size cap, for every download fedtorrent makes.

A server may be hostile: it may answer ``100 Continue`` forever, trickle one byte a second, never
finish its headers, send lines of 70 kB, a bad chunk size or a huge ``Content-Length``. So the
whole request (name lookup, connect, TLS handshake, status line, headers and every byte of the
body) must end by one ``deadline`` (a ``time.monotonic()`` value), and no more than ``limit``
body bytes are ever read. Every failure is a :class:`~fedtorrent.errors.NetworkError` with a
short one-line message; an error status is the subclass :class:`HTTPStatusError`.

Why ``http.client`` and not ``urllib``: urllib only offers a timeout per socket operation, so
``100 Continue`` loops and trickled bytes can run far past it. Here ``http.client`` parses
(status line, headers with its 64 kB line and 100 header limits, chunked bodies), but every
``recv`` goes through :class:`_DeadlineReader`, which sets the socket timeout to the time left
(or ``idle``, whichever is shorter) before each call, so the deadline holds however the bytes
are cut. Redirects (at most :data:`MAX_REDIRECTS`) are followed within the same deadline; proxy
variables (``http_proxy``...) are not honoured.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedtorrent.errors import NetworkError, printable
from fedtorrent.files import atomic_writer

MAX_REDIRECTS = 5
CHUNK_BYTES = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_MESSAGE_CHARS = 200


class HTTPStatusError(NetworkError):
    """The server answered with an error status; ``reason`` is its short explanation if any.

    ``json_reason``: the reason came from a JSON ``failure reason`` body (our tracker's).
    """

    def __init__(
        self,
        url: str,
        status: int,
        reason: str,
        *,
        retry_after: float | None = None,
        json_reason: bool = False,
    ) -> None:
        super().__init__(f"{_short(url)} answered {status}: {_clip(reason)}")
        self.status, self.reason, self.retry_after = status, reason, retry_after
        self.json_reason = json_reason


def fetch_bytes(url: str, *, deadline: float, limit: int) -> bytes:
    """GET ``url`` and return its body, at most ``limit`` bytes, all by ``deadline``.

    Raises:
        HTTPStatusError: a status other than 2xx (after redirects).
        NetworkError: anything else: unreachable, too slow, malformed HTTP, or too large.
    """
    parts = bytearray()
    for chunk in _body(url, deadline=deadline, limit=limit, idle=None):
        parts += chunk
    return bytes(parts)


def fetch_to_file(
    url: str,
    dest: str | Path,
    *,
    deadline: float,
    limit: int,
    check: Callable[[int, str], None],
    idle: float | None = None,
    progress: Callable[[int | None, int], None] | None = None,
) -> Path:
    """Stream ``url`` into a temporary file beside ``dest``; rename it onto ``dest`` if it checks.

    ``check(size, sha256_hex)`` is called once the body is complete and raises to refuse it; only
    then is ``dest`` replaced, so it is either untouched or complete. ``idle`` (seconds), when
    given, also ends a download that stays silent that long; ``progress(total, n)`` is told the
    declared length (or None) and each chunk's size.

    Raises:
        HTTPStatusError, NetworkError: as :func:`fetch_bytes`; whatever ``check`` raises.
    """
    digest, size = hashlib.sha256(), 0
    declared: list[int | None] = [None]
    with atomic_writer(dest) as handle:
        for chunk in _body(url, deadline=deadline, limit=limit, idle=idle, lengths=declared):
            digest.update(chunk)
            handle.write(chunk)
            size += len(chunk)
            if progress is not None:
                progress(declared[-1], len(chunk))
        check(size, digest.hexdigest())
    return Path(dest)


def _body(
    url: str,
    *,
    deadline: float,
    limit: int,
    idle: float | None,
    lengths: list[int | None] | None = None,
) -> Iterator[bytes]:
    """The body of ``url`` in chunks, following redirects; every failure is a NetworkError.

    The declared length (None when chunked or absent) is appended to ``lengths`` when given.
    """
    start = time.monotonic()
    try:
        for _ in range(MAX_REDIRECTS + 1):
            with _response(url, deadline=deadline, idle=idle) as response:
                if response.status in _REDIRECTS and response.getheader("Location"):
                    url = urllib.parse.urljoin(url, response.getheader("Location", ""))
                    continue
                if not 200 <= response.status < 300:
                    raise _status_error(url, response)
                if lengths is not None:
                    lengths.append(response.length)
                yield from _read_body(url, response, limit)
                return
        raise NetworkError(f"cannot download {_short(url)}: more than {MAX_REDIRECTS} redirects")
    except TimeoutError:
        waited = time.monotonic() - start
        raise NetworkError(
            f"cannot download {_short(url)}: no complete answer in time ({waited:.1f} s)"
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # OSError covers refused, reset, unreachable and ssl.SSLError; HTTPException covers
        # BadStatusLine, LineTooLong, too many headers, IncompleteRead and RemoteDisconnected;
        # ValueError covers bad URLs, ports and host names.
        raise NetworkError(f"cannot download {_short(url)}: {_describe(exc)}") from None


def _read_body(url: str, response: http.client.HTTPResponse, limit: int) -> Iterator[bytes]:
    declared = response.length  # None when chunked or unknown; http.client drops bad values
    if declared is not None and declared > limit:
        raise NetworkError(
            f"cannot download {_short(url)}: announces {declared} bytes, over the {limit} limit"
        )
    received = 0
    while chunk := response.read(CHUNK_BYTES):
        received += len(chunk)
        if received > limit:
            raise NetworkError(f"cannot download {_short(url)}: sent more than {limit} bytes")
        yield chunk
    if declared is not None and received != declared:
        raise NetworkError(
            f"cannot download {_short(url)}: ended after {received} of {declared} bytes"
        )


@contextmanager
def _response(
    url: str, *, deadline: float, idle: float | None
) -> Iterator[http.client.HTTPResponse]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NetworkError(f"cannot download {_short(url)}: not an http(s) URL")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    sock = _connect(host, port, deadline)
    try:
        if parts.scheme == "https":
            sock = _tls(sock, host, deadline)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        if ":" in host and parts.port is None:
            host_header = f"[{host}]"
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: fedtorrent\r\n"
            "Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
        )
        sock.settimeout(_left(deadline))
        sock.sendall(request.encode("ascii"))
        response = http.client.HTTPResponse(_DeadlineSocket(sock, deadline, idle), method="GET")  # type: ignore[arg-type]
        response.begin()
        try:
            yield response
        finally:
            response.close()
    finally:
        sock.close()


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to ``host``, name lookup included, by ``deadline``."""
    addresses = _resolve(host, port, deadline)
    last: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            last = exc
    raise last


def _resolve(host: str, port: int, deadline: float) -> list[Any]:
    """``getaddrinfo`` in a helper thread, so a stuck name server cannot outlast the deadline."""
    found: list[Any] = []
    failed: list[BaseException] = []

    def lookup() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            failed.append(exc)

    worker = threading.Thread(target=lookup, name="fedtorrent-resolve", daemon=True)
    worker.start()
    worker.join(_left(deadline))
    if worker.is_alive():
        raise TimeoutError(f"name lookup for {host}")
    if failed:
        raise failed[0]
    return found


def _tls(sock: socket.socket, host: str, deadline: float) -> ssl.SSLSocket:
    """The TLS handshake, step by step, so no step can wait past the deadline."""
    wrapped = ssl.create_default_context().wrap_socket(
        sock, server_hostname=host, do_handshake_on_connect=False
    )
    wrapped.setblocking(False)
    while True:
        try:
            wrapped.do_handshake()
            return wrapped
        except ssl.SSLWantReadError:
            readable, _, _ = select.select([wrapped], [], [], _left(deadline))
            if not readable:
                raise TimeoutError("TLS handshake") from None
        except ssl.SSLWantWriteError:
            _, writable, _ = select.select([], [wrapped], [], _left(deadline))
            if not writable:
                raise TimeoutError("TLS handshake") from None


def _left(deadline: float) -> float:
    """Seconds left before ``deadline``; TimeoutError when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class _DeadlineReader(io.RawIOBase):
    """A socket read as a stream, each ``recv`` bounded by the time left (and ``idle``)."""

    def __init__(self, sock: socket.socket, deadline: float, idle: float | None) -> None:
        super().__init__()
        self._sock, self._deadline, self._idle = sock, deadline, idle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = _left(self._deadline)
        self._sock.settimeout(left if self._idle is None else min(left, self._idle))
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """What ``http.client.HTTPResponse`` needs of a socket: ``makefile`` for reading."""

    def __init__(self, sock: socket.socket, deadline: float, idle: float | None) -> None:
        self._reader = _DeadlineReader(sock, deadline, idle)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self._reader)


def _status_error(url: str, response: http.client.HTTPResponse) -> HTTPStatusError:
    try:
        body = response.read(4096)
    except (OSError, http.client.HTTPException, ValueError):
        body = b""
    header = response.getheader("Retry-After", "") or ""
    retry_after = float(header) if header.isdigit() and len(header) < 9 else None
    reason = _reason(body)
    return HTTPStatusError(
        url,
        response.status,
        reason or response.reason,
        retry_after=retry_after,
        json_reason=bool(reason),
    )


def _reason(body: bytes) -> str:
    """The ``failure reason`` of a JSON error body (the tracker's), else empty."""
    if not body.startswith(b"{"):
        return ""
    try:
        reason = json.loads(body).get("failure reason")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return reason if isinstance(reason, str) else ""


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return _clip(f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text)


def _clip(text: str) -> str:
    """A server's or URL's text for a message: escaped (one line, no escape sequences), clipped."""
    text = printable(text)
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[:_MAX_MESSAGE_CHARS] + "..."


def _short(url: str) -> str:
    """The URL without its query, clipped: what an error message names."""
    return _clip(url.partition("?")[0])
