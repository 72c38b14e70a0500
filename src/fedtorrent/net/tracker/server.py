"""The tracker's HTTP face: a thin aiohttp app over ``SwarmRegistry``, plus write-behind to SQLite.

Routes (all GET; see docs/protocol.md): ``/announce``, ``/scrape``, ``/swarms``,
``/swarms/{info_hash}``, ``/swarms/{info_hash}/history``, ``/healthz``, ``/metrics``, ``/``
(dashboard), ``/torrents``, ``/torrents/{info_hash}`` and ``/torrents/{info_hash}/state``. One
middleware refuses long URLs, request bodies and over-eager clients before any handler runs; one
response hook counts the bytes of every HTTP message in and out, per swarm where the request names
one. Below HTTP, a ``ConnectionGuard`` cuts slow and idle connections and caps them per address.

Constructing a server opens nothing; ``start()`` loads served torrents, restores swarms from the
database and binds the socket; ``close()`` flushes and stops. ``serve()`` does both around a wait
for SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import math
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from fedtorrent.config import TrackerConfig
from fedtorrent.errors import TorrentError
from fedtorrent.net.torrent import bencode, load_torrent, state_path_for, verify_initial_state
from fedtorrent.net.tracker.connections import ConnectionGuard
from fedtorrent.net.tracker.registry import (
    RateLimiter,
    RequestRejected,
    SwarmRegistry,
    normalize_address,
    parse_announce,
    parse_info_hash,
)
from fedtorrent.net.tracker.store import SwarmStore

log = logging.getLogger(__name__)


class _QuietOnBadHttp(logging.Filter):
    """Drop aiohttp's traceback for malformed requests: hostile clients must not flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


http_log = logging.getLogger(__name__ + ".http")
http_log.addFilter(_QuietOnBadHttp())
MAX_SCRAPE_HASHES = 100
MAX_LISTED_PEERS = 1000
"""``/swarms/{info_hash}`` lists at most this many peers (sorted by peer id)."""
_JSON = "application/json"
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_T = TypeVar("_T")
INFO_HASH_KEY = web.RequestKey("info_hash", str)
CONNECTION_REASONS = ("header_timeout", "idle_timeout", "address_cap")
"""Set by handlers whose request names a swarm, so its bytes are counted to that swarm."""


@dataclass(frozen=True)
class ServedTorrent:
    """A torrent the tracker hands out, with its verified initial state file."""

    info_hash: str
    name: str
    payload: bytes
    state_path: Path
    state_size: int

    @classmethod
    def load(cls, path: str | Path) -> ServedTorrent:
        """Read a torrent and check the state file beside it (``state_path_for``).

        Raises:
            TorrentError: the torrent is malformed or its state file is missing or differs.
        """
        torrent = load_torrent(path)
        state_path = state_path_for(path)
        try:
            payload = state_path.read_bytes()
        except OSError as exc:
            raise TorrentError(f"cannot read initial state {state_path}: {exc}") from exc
        verify_initial_state(torrent, payload)
        return cls(
            info_hash=torrent.info_hash,
            name=torrent.session.name,
            payload=torrent.to_bytes(),
            state_path=state_path,
            state_size=len(payload),
        )


class TrackerServer:
    """One tracker: registry in memory, optional SQLite file, aiohttp on ``config.host:port``."""

    def __init__(
        self,
        config: TrackerConfig,
        *,
        torrents: Sequence[str | Path] = (),
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._torrent_paths = [Path(p) for p in torrents]
        self._clock = clock
        self.registry = SwarmRegistry(config, clock=clock, rng=rng)
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst)
        self.guard = ConnectionGuard(
            header_timeout=config.header_timeout,
            idle_timeout=config.idle_timeout,
            max_per_address=config.max_connections_per_address,
            normalize=normalize_address,
        )
        self.served: dict[str, ServedTorrent] = {}
        self.port: int | None = None
        """The bound port once started (useful with ``config.port == 0``)."""
        self.counters = {"announces": 0, "scrapes": 0, "bytes_in": 0, "bytes_out": 0}
        self.rejected: dict[int, int] = {}
        self.refused: Counter[str] = Counter()
        """Refusals by ``RequestRejected.kind`` (signatures, replays, the address cap)."""
        self._store: SwarmStore | None = None
        self._runner: web.AppRunner | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._dashboard = b""
        self._started = 0.0
        self._sources: dict[str, str] = {}

    @property
    def url(self) -> str:
        """``http://host:port`` of the running tracker."""
        if self.port is None:
            raise RuntimeError("tracker is not started")
        host = self.config.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def announce_url(self) -> str:
        """The URL a torrent's ``announce`` key should hold."""
        return f"{self.url}/announce"

    async def start(self) -> None:
        """Load torrents, restore swarms, bind the socket and start the write-behind task.

        Raises:
            TorrentError: a served torrent or its state file does not verify.
            StoreError: the database cannot be opened.
            OSError: the address cannot be bound.
        """
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        for path in self._torrent_paths:
            served = ServedTorrent.load(path)
            self.served[served.info_hash] = served
        self.registry.allow_served(self.served)
        if self.config.db_path is not None:
            self._store = SwarmStore(self.config.db_path)
            self._store.open()
            self.registry.restore(*self._store.load())
        self._dashboard = (
            importlib.resources.files("fedtorrent.net.tracker")
            .joinpath("dashboard.html")
            .read_bytes()
        )
        app = web.Application(middlewares=[self._guard], client_max_size=1024)
        app.on_response_prepare.append(self._count_bytes)
        app.add_routes(
            [
                web.get("/announce", self._announce),
                web.get("/scrape", self._scrape),
                web.get("/swarms", self._swarms),
                web.get("/swarms/{info_hash}", self._swarm),
                web.get("/swarms/{info_hash}/history", self._history),
                web.get("/healthz", self._healthz),
                web.get("/metrics", self._metrics),
                web.get("/", self._dashboard_page),
                web.get("/torrents", self._torrents),
                web.get("/torrents/{info_hash}", self._torrent),
                web.get("/torrents/{info_hash}/state", self._state),
            ]
        )
        self._runner = web.AppRunner(
            app,
            access_log=None,
            logger=http_log,
            max_line_size=8190,
            max_field_size=4096,
            max_headers=32,
            # aiohttp's own deadline for a request after opening or after an answer: the
            # backstop behind the guard's (counted) header and idle timeouts.
            keepalive_timeout=self.config.header_timeout + self.config.idle_timeout,
        )
        await self._runner.setup()
        site = _GuardedSite(self._runner, self.config.host, self.config.port, guard=self.guard)
        await site.start()
        self.guard.start()
        self.port = int(self._runner.addresses[0][1])
        self._started = time.monotonic()
        self._stopping = asyncio.Event()
        self._flusher = asyncio.create_task(self._flush_forever())

    async def close(self) -> None:
        """Stop serving, write the last changes and close the database (idempotent)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.guard.stop()
        if self._flusher is not None:
            self._stopping.set()
            await self._flusher  # finishes any write in progress, never abandons one
            self._flusher = None
        if self._store is not None:
            self.registry.expire()
            await self.flush()
            self._store.close()
            self._store = None

    async def __aenter__(self) -> TrackerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def serve(self, *, ready: Callable[[str], None] | None = None) -> None:
        """Run until SIGINT or SIGTERM (blocking); ``ready(url)`` is called once listening."""

        async def run() -> None:
            await self.start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                if ready is not None:
                    ready(self.url)
                await stop.wait()
            finally:
                await self.close()

        asyncio.run(run())

    async def flush(self) -> int:
        """Write pending registry changes now; returns the number of rows written."""
        async with self._write_lock:  # one writer at a time, batches in drain order
            changes = self.registry.drain_changes()
            if self._store is None or not changes:
                return 0
            await asyncio.to_thread(self._store.write, changes)
        return len(changes.peers) + len(changes.gone_peers) + len(changes.swarms)

    async def _flush_forever(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.flush_interval)
            try:
                self.registry.expire()
                self.limiter.prune(self._clock())
                await self.flush()
            except Exception:  # keep serving from memory; the next flush retries
                log.exception("tracker write-behind flush failed")

    # --- plumbing shared by every route ----------------------------------------------------------

    def _source(self, request: web.Request) -> str:
        remote = request.remote or ""
        source = self._sources.get(remote)
        if source is None:
            try:
                source = normalize_address(remote)
            except ValueError:
                raise RequestRejected(400, "request has no IP source address") from None
            if len(self._sources) >= 4096:
                self._sources.clear()
            self._sources[remote] = source
        return source

    @web.middleware
    async def _guard(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        self.guard.request_started(request.transport)
        try:
            return await self._guarded(request, handler)
        finally:
            self.guard.request_finished(request.transport)

    async def _guarded(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            if len(request.raw_path) > self.config.max_url_bytes:
                raise RequestRejected(414, f"URL longer than {self.config.max_url_bytes} bytes")
            if request.content_length or request.headers.get("Transfer-Encoding"):
                raise RequestRejected(413, "the tracker accepts no request bodies")
            wait = self.limiter.admit(self._source(request), self._clock())
            if wait > 0:
                raise RequestRejected(429, "rate limit exceeded", retry_after=wait)
            return await handler(request)
        except RequestRejected as exc:
            self.rejected[exc.status] = self.rejected.get(exc.status, 0) + 1
            if exc.kind is not None:
                self.refused[exc.kind] += 1
            query = request.query
            bencoded = query.get("compact") == "1" or query.get("format") == "bencode"
            if bencoded:
                body = bencode({b"failure reason": exc.reason.encode()})
                response = web.Response(status=exc.status, body=body, content_type="text/plain")
            else:
                body = json.dumps({"failure reason": exc.reason}).encode()
                response = web.Response(status=exc.status, body=body, content_type=_JSON)
            if exc.retry_after is not None:
                response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            if exc.status in (413, 414):
                response.force_close()
            return response

    async def _count_bytes(self, request: web.Request, response: web.StreamResponse) -> None:
        received = len(request.method) + len(request.raw_path) + 12 + (request.content_length or 0)
        received += sum(len(k) + len(v) + 4 for k, v in request.raw_headers) + 2
        sent = 15 + len(response.reason) + (response.content_length or 0)
        sent += sum(len(k) + len(v) + 4 for k, v in response.headers.items()) + 2
        self.counters["bytes_in"] += received
        self.counters["bytes_out"] += sent
        info_hash = request.get(INFO_HASH_KEY)
        if info_hash is not None:
            self.registry.count_bytes(info_hash, received=received, sent=sent)

    def _only_params(self, request: web.Request, allowed: set[str]) -> None:
        for name in request.query:
            if name not in allowed:
                raise RequestRejected(400, f"unknown parameter {name[:40]!r}")

    def _visible(self, info_hash: str) -> bool:
        allow = self.registry.allow
        return allow is None or info_hash in allow

    # --- routes ----------------------------------------------------------------------------------

    async def _announce(self, request: web.Request) -> web.Response:
        announce = parse_announce(
            request.query.items(), source=self._source(request), config=self.config
        )
        request[INFO_HASH_KEY] = announce.info_hash
        answer = self.registry.announce(announce)
        self.counters["announces"] += 1
        if announce.bencoded:
            return web.Response(body=answer.to_bencode(), content_type="text/plain")
        return web.Response(body=answer.to_json(), content_type=_JSON)

    async def _scrape(self, request: web.Request) -> web.Response:
        self._only_params(request, {"info_hash", "compact", "format"})
        wanted = [parse_info_hash(h) for h in request.query.getall("info_hash", [])]
        if len(wanted) > MAX_SCRAPE_HASHES:
            raise RequestRejected(400, f"at most {MAX_SCRAPE_HASHES} info_hash parameters")
        files = {h: s for h, s in self.registry.scrape(wanted).items() if self._visible(h)}
        self.counters["scrapes"] += 1
        query = request.query
        if query.get("compact") == "1" or query.get("format") == "bencode":
            payload = {
                h.encode(): {k.encode(): v for k, v in stats.items()} for h, stats in files.items()
            }
            return web.Response(body=bencode({b"files": payload}), content_type="text/plain")
        return web.json_response({"files": files})

    async def _swarms(self, request: web.Request) -> web.Response:
        self._only_params(request, set())
        swarms = [s.stats() for s in self.registry.swarms() if self._visible(s.info_hash)]
        names = {h: t.name for h, t in self.served.items()}
        for stats in swarms:
            stats["name"] = names.get(stats["info_hash"])
        return web.json_response({"interval": self.config.interval, "swarms": swarms})

    async def _swarm(self, request: web.Request) -> web.Response:
        self._only_params(request, set())
        info_hash = parse_info_hash(request.match_info["info_hash"])
        swarm = self.registry.swarm(info_hash)
        if swarm is None or not self._visible(info_hash):
            raise RequestRejected(404, "unknown swarm")
        stats = swarm.stats()
        listed = sorted(swarm.members, key=lambda p: p.peer_id)[:MAX_LISTED_PEERS]
        stats["name"] = self.served[info_hash].name if info_hash in self.served else None
        stats["peer_list"] = [p.to_dict() for p in listed]
        stats["peer_list_truncated"] = len(swarm.members) > MAX_LISTED_PEERS
        return web.json_response(stats)

    async def _history(self, request: web.Request) -> web.Response:
        self._only_params(request, set())
        info_hash = parse_info_hash(request.match_info["info_hash"])
        if self.registry.swarm(info_hash) is None or not self._visible(info_hash):
            raise RequestRejected(404, "unknown swarm")
        request[INFO_HASH_KEY] = info_hash
        series = self.registry.history(info_hash)
        peers = [
            {"peer_id": peer_id, "points": [list(point) for point in series[peer_id]]}
            for peer_id in sorted(series)
        ]
        return web.json_response(
            {
                "info_hash": info_hash,
                "fields": ["round", "accuracy", "bytes_sent", "bytes_received"],
                "max_rounds": self.config.history_rounds,
                "peers": peers,
            }
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "swarms": len(self.registry.swarms()),
                "peers": self.registry.peer_count,
                "uptime_s": round(time.monotonic() - self._started, 3),
                "persistent": self._store is not None,
                "connections": {"open": self.guard.open, **self._cut_counts()},
                "refused": dict(sorted(self.refused.items())),
            }
        )

    def _cut_counts(self) -> dict[str, int]:
        counts = self.guard.counts
        return {
            "cut_header_timeout": counts["header_timeout"],
            "cut_idle_timeout": counts["idle_timeout"],
            "refused_address_cap": counts["address_cap"],
        }

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text(), content_type="text/plain")

    def metrics_text(self) -> str:
        """Prometheus text exposition (version 0.0.4) of the tracker's counters and gauges."""
        swarms = self.registry.swarms()
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
            lines.append(f"# HELP fedtorrent_tracker_{name} {help_text}")
            lines.append(f"# TYPE fedtorrent_tracker_{name} {kind}")
            lines.extend(f"fedtorrent_tracker_{name}{labels} {value}" for labels, value in samples)

        metric(
            "announces_total", "counter", "Announces answered.", [("", self.counters["announces"])]
        )
        metric("scrapes_total", "counter", "Scrapes answered.", [("", self.counters["scrapes"])])
        metric(
            "rejected_total",
            "counter",
            "Requests refused, by HTTP status.",
            [(f'{{status="{s}"}}', n) for s, n in sorted(self.rejected.items())],
        )
        metric(
            "bytes_received_total",
            "counter",
            "HTTP request bytes received (request line, headers, body).",
            [("", self.counters["bytes_in"])],
        )
        metric(
            "bytes_sent_total",
            "counter",
            "HTTP response bytes sent (status line, headers, body).",
            [("", self.counters["bytes_out"])],
        )
        metric(
            "refused_total",
            "counter",
            "Announces refused, by reason (unsigned, bad_signature, stale, replay, address_cap).",
            [(f'{{reason="{k}"}}', n) for k, n in sorted(self.refused.items())],
        )
        metric("connections", "gauge", "Connections open.", [("", self.guard.open)])
        metric(
            "connections_closed_total",
            "counter",
            "Connections the tracker cut (header_timeout, idle_timeout) or refused (address_cap).",
            [(f'{{reason="{k}"}}', self.guard.counts[k]) for k in CONNECTION_REASONS],
        )
        metric("swarms", "gauge", "Swarms known.", [("", len(swarms))])
        metric("peers", "gauge", "Live peers over all swarms.", [("", self.registry.peer_count)])
        visible = [s for s in swarms if self._visible(s.info_hash)]
        metric(
            "swarm_peers",
            "gauge",
            "Live peers per swarm.",
            [(f'{{info_hash="{s.info_hash}"}}', len(s.members)) for s in visible],
        )
        metric(
            "swarm_bytes_received_total",
            "counter",
            "Tracker request bytes per swarm (kept across restarts).",
            [(f'{{info_hash="{s.info_hash}"}}', s.tracker_bytes_in) for s in visible],
        )
        metric(
            "swarm_bytes_sent_total",
            "counter",
            "Tracker response bytes per swarm (kept across restarts).",
            [(f'{{info_hash="{s.info_hash}"}}', s.tracker_bytes_out) for s in visible],
        )
        return "\n".join(lines) + "\n"

    async def _dashboard_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._dashboard, content_type="text/html", charset="utf-8")

    async def _torrents(self, request: web.Request) -> web.Response:
        listing = [
            {"info_hash": t.info_hash, "name": t.name, "state_size": t.state_size}
            for t in self.served.values()
        ]
        return web.json_response({"torrents": listing})

    def _served(self, request: web.Request) -> ServedTorrent:
        info_hash = parse_info_hash(request.match_info["info_hash"])
        served = self.served.get(info_hash)
        if served is None:
            raise RequestRejected(404, "this tracker does not serve that torrent")
        request[INFO_HASH_KEY] = info_hash
        return served

    async def _torrent(self, request: web.Request) -> web.Response:
        served = self._served(request)
        return web.Response(body=served.payload, content_type="application/x-bittorrent")

    async def _state(self, request: web.Request) -> web.FileResponse:
        served = self._served(request)
        response = web.FileResponse(
            served.state_path, headers={"Content-Type": "application/octet-stream"}
        )
        await response.prepare(request)  # sent here, so the guard sees the connection busy
        return response


class _GuardedSite(web.BaseSite):
    """A TCP site whose connections pass through a ``ConnectionGuard`` (like ``web.TCPSite``)."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, *, guard: ConnectionGuard
    ) -> None:
        super().__init__(runner, backlog=1024)
        self._host, self._port, self._guard = host, port, guard

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server), self._host, self._port, backlog=self._backlog
        )


class BackgroundTracker:
    """A ``TrackerServer`` on its own event-loop thread, for synchronous programs (demos, tests).

    ``start()`` returns once the socket is bound; ``call(fn)`` runs ``fn(server)`` on the loop
    thread (the registry is not thread-safe); ``close()`` stops the server and joins the thread.
    """

    def __init__(self, config: TrackerConfig, **kwargs: Any) -> None:
        self.server = TrackerServer(config, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the running tracker."""
        return self.server.url

    def start(self, *, timeout: float = 30.0) -> None:
        """Start the server thread; raises whatever ``TrackerServer.start`` raised."""
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.server.start())
            except BaseException as exc:  # handed to the starting thread below
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fedtorrent-tracker", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise RuntimeError("tracker did not start in time")
        if failure:
            self._thread.join()
            self._loop = self._thread = None
            raise failure[0]

    def call(self, fn: Callable[[TrackerServer], _T], *, timeout: float = 30.0) -> _T:
        """Run ``fn(server)`` on the server's loop and return its result."""
        if self._loop is None:
            raise RuntimeError("tracker is not started")

        async def invoke() -> _T:
            return fn(self.server)

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(timeout)

    def close(self, *, timeout: float = 30.0) -> None:
        """Flush, stop serving and join the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.server.close(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._thread = None

    def __enter__(self) -> BackgroundTracker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
