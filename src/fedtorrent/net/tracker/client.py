"""A blocking tracker client for a peer's thread: timeouts, retries with backoff, a cached answer.

When the tracker cannot be reached after all retries, ``announce`` hands back the last peer list it
got for that swarm (marked ``cached``), so a peer keeps training with the cohort it knows instead of
stopping. Answers are checked like any bytes from outside: size first, then every field. A client
given the peer's identity signs every announce (fresh ``ts`` on every attempt), so the tracker lets
the peer stop, move or change key while nobody else can.

The client speaks two flavours: ours (JSON answers that carry keys; signed announces) and that of
a standard BitTorrent tracker (``tracker.bittorrent``: 20-byte info-hash, compact lists, no keys).
By default it asks in ours first and, when the tracker answers that with something other than
our JSON, asks again in BitTorrent's; the first flavour that gets an answer is kept.
"""

from __future__ import annotations

import ipaddress
import json
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtorrent.errors import NetworkError, TrackerError
from fedtorrent.files import write_atomic
from fedtorrent.net.download import HTTPStatusError, fetch_bytes, fetch_to_file
from fedtorrent.net.identity import announce_message
from fedtorrent.net.torrent import (
    MAX_TORRENT_BYTES,
    Torrent,
    check_initial_state,
    check_model_size,
    format_float,
    is_info_hash,
    state_path_for,
    verify_initial_state,
)
from fedtorrent.net.tracker import bittorrent
from fedtorrent.net.tracker.registry import (
    PEER_ID,
    RequestRejected,
    normalize_address,
    parse_pubkey,
)

if TYPE_CHECKING:
    from fedtorrent.net.identity import PeerIdentity

MAX_ANSWER_BYTES = 1 << 20
MAX_PEERS_IN_ANSWER = bittorrent.MAX_PEERS
FLAVOURS = ("auto", "fedtorrent", "bittorrent")
_RETRYABLE = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class PeerAddress:
    """Where to reach another peer of the swarm, and the public key it announced (or None)."""

    peer_id: str
    ip: str
    port: int
    pubkey: str | None = None


@dataclass(frozen=True)
class TrackerAnswer:
    """An announce answer; ``cached`` is True when it is the last good one replayed offline."""

    interval: int
    complete: int
    incomplete: int
    peers: tuple[PeerAddress, ...]
    received_at: float
    """``time.time()`` when the tracker sent it."""
    cached: bool = False
    flavour: str = "fedtorrent"
    """``bittorrent``: a standard tracker listed addresses only, each peer's ``peer_id`` is
    ``bittorrent.address_label`` and its ``port`` its hello port (``node.hello`` resolves them)."""


class TrackerRefusedError(TrackerError):
    """The tracker answered with an error status; ``status`` and ``reason`` say which and why.

    A BitTorrent tracker's ``failure reason`` comes with status 200. ``json_reason``: the reason
    came as our tracker's JSON ``failure reason``.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        retry_after: float | None = None,
        json_reason: bool = False,
    ) -> None:
        super().__init__(f"tracker refused ({status}): {reason}")
        self.status, self.reason, self.retry_after = status, reason, retry_after
        self.json_reason = json_reason


class TrackerClient:
    """Talks to one tracker; safe to share between threads.

    Args:
        url: the tracker's base URL or its announce URL (``.../announce``), as in a torrent.
        timeout: seconds per HTTP attempt.
        retries: extra attempts after the first for timeouts, refused connections, 429 and 5xx.
        backoff: first retry delay in seconds; doubles each retry (jittered to 50-100 %), capped
            by ``max_backoff``. A ``Retry-After`` header from the tracker takes precedence.
        sleep: how to wait between attempts (tests pass a fake).
        identity: the peer's key; when given, every announce carries ``sig`` and ``ts``.
        flavour: ``auto`` (see the module), ``fedtorrent`` or ``bittorrent``.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        identity: PeerIdentity | None = None,
        flavour: str = "auto",
    ) -> None:
        if flavour not in FLAVOURS:
            raise TrackerError(f"tracker flavour must be one of {', '.join(FLAVOURS)}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TrackerError(f"tracker URL must be http(s)://host[:port][/announce], got {url!r}")
        path = parts.path.rstrip("/")
        path = path.removesuffix("/announce")
        self.base_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self.timeout, self.retries, self.backoff, self.max_backoff = (
            timeout,
            retries,
            backoff,
            max_backoff,
        )
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._lock = threading.Lock()
        self._cache: dict[str, TrackerAnswer] = {}
        self.identity = identity
        self._last_ts = 0
        self.flavour = flavour
        """``auto`` until an answer came, then the flavour that got it."""
        self.announce_url = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc, path + "/announce", parts.query, "")
        )
        """Where BitTorrent announces go: the URL as given, ending in ``/announce``."""

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
        """Announce this peer and get a random sample of other live peers.

        A BitTorrent tracker hears ``hello_port`` (when given) instead of ``port``, the bytes and
        the event, nothing else; its answer lists addresses only (``flavour`` ``bittorrent``).

        Raises:
            TrackerRefusedError: the tracker rejected the announce (4xx other than 429).
            TrackerError: unreachable (or 429/5xx) after all retries with no earlier answer for
                this swarm; a ``stopped`` announce never falls back to the cache.
        """
        params: dict[str, str] = {
            "info_hash": info_hash,
            "peer_id": peer_id,
            "port": str(port),
            "round": str(round),
            "bytes_sent": str(bytes_sent),
            "bytes_received": str(bytes_received),
        }
        if pubkey is not None:
            try:
                pubkey = parse_pubkey(pubkey)  # the canonical spelling, as the tracker signs it
            except RequestRejected as exc:
                raise TrackerError(exc.reason) from None
        if ip is not None:
            try:
                ip = normalize_address(ip)
            except ValueError:
                raise TrackerError(f"ip must be an IP literal, got {ip[:40]!r}") from None
        optional = {"event": event or None, "pubkey": pubkey, "ip": ip}
        optional["numwant"] = None if numwant is None else str(numwant)
        optional["accuracy"] = None if accuracy is None else format_float(accuracy)
        params.update({k: v for k, v in optional.items() if v is not None})
        sign = None if self.identity is None else self._signer(params)
        bt_query = bittorrent.announce_query(
            info_hash,
            peer_id,
            port=hello_port or port,
            event=event,
            numwant=numwant,
            uploaded=bytes_sent,
            downloaded=bytes_received,
            ip=ip,
        )
        try:
            answer = self._announce_as(self.flavour, params, sign, bt_query)
        except TrackerError as exc:
            if isinstance(exc, TrackerRefusedError) and exc.status not in _RETRYABLE:
                raise
            with self._lock:
                cached = self._cache.get(info_hash)
            if cached is None or event == "stopped":
                raise
            return replace(cached, cached=True)
        with self._lock:
            self._cache[info_hash] = answer
        return answer

    def _announce_as(
        self,
        flavour: str,
        params: dict[str, str],
        sign: Callable[[], dict[str, str]] | None,
        bt_query: list[tuple[str, str | bytes]],
    ) -> TrackerAnswer:
        """One announce in ``flavour``; ``auto`` tries ours, then BitTorrent's, keeps what works."""
        if flavour == "bittorrent":
            body = self._get("/announce", bt_query, MAX_ANSWER_BYTES)
            listing = bittorrent.parse_answer(body)
            if listing.failure is not None:
                raise TrackerRefusedError(200, listing.failure)
            self.flavour = "bittorrent"
            return TrackerAnswer(
                interval=listing.interval,
                complete=listing.complete,
                incomplete=listing.incomplete,
                peers=tuple(
                    PeerAddress(peer_id=bittorrent.address_label(ip, port), ip=ip, port=port)
                    for ip, port in listing.addresses
                ),
                received_at=time.time(),
                flavour="bittorrent",
            )
        try:
            answer = parse_answer(self._get("/announce", params, MAX_ANSWER_BYTES, sign=sign))
        except TrackerError as exc:
            if flavour == "fedtorrent" or not _maybe_bittorrent(exc):
                raise
            try:
                return self._announce_as("bittorrent", params, sign, bt_query)
            except TrackerRefusedError as refused:
                if refused.status == 200:  # a bencoded failure reason: a BitTorrent tracker
                    raise
                raise exc from None
            except TrackerError:
                raise exc from None
        self.flavour = "fedtorrent"
        return answer

    def _signer(self, params: dict[str, str]) -> Callable[[], dict[str, str]]:
        """Params plus ``sig`` and a ``ts`` newer than any before (called once per attempt)."""
        identity = self.identity
        assert identity is not None
        event = params.get("event", "")

        def signed() -> dict[str, str]:
            with self._lock:
                ts = self._last_ts = max(time.time_ns() // 1000, self._last_ts + 1)
            message = announce_message(
                info_hash=params["info_hash"].lower(),
                peer_id=params["peer_id"],
                event="" if event == "empty" else event,
                ip=params.get("ip", ""),
                port=int(params["port"]),
                pubkey=params.get("pubkey", ""),
                ts=ts,
            )
            return {**params, "ts": str(ts), "sig": identity.sign(message).hex()}

        return signed

    def last_answer(self, info_hash: str) -> TrackerAnswer | None:
        """The last answer the tracker gave for ``info_hash``, if any."""
        with self._lock:
            return self._cache.get(info_hash)

    def scrape(self, info_hashes: Iterable[str] = ()) -> dict[str, dict[str, int]]:
        """``{info_hash: {complete, incomplete, downloaded}}``; all swarms when none are named."""
        params = [("info_hash", h) for h in info_hashes]
        document = _json_object(self._get("/scrape", params, MAX_ANSWER_BYTES), "scrape")
        files = document.get("files")
        if not isinstance(files, dict):
            raise TrackerError("scrape answer has no files dictionary")
        return files

    def swarm(self, info_hash: str) -> dict[str, Any]:
        """The tracker's JSON statistics for one swarm (``/swarms/{info_hash}``)."""
        return _json_object(self._get(f"/swarms/{info_hash}", {}, 16 * MAX_ANSWER_BYTES), "swarm")

    def healthz(self) -> dict[str, Any]:
        """The tracker's health document; raises TrackerError when it is down."""
        return _json_object(self._get("/healthz", {}, MAX_ANSWER_BYTES), "healthz")

    def fetch_torrent(self, info_hash: str) -> Torrent:
        """Download and strictly parse a torrent the tracker serves, checking its info-hash."""
        payload = self._get(f"/torrents/{info_hash}", {}, MAX_TORRENT_BYTES)
        torrent = Torrent.from_bytes(payload)
        if torrent.info_hash != info_hash:
            raise TrackerError(f"tracker served torrent {torrent.info_hash}, asked {info_hash}")
        return torrent

    def fetch_state(self, torrent: Torrent) -> bytes:
        """Download the initial state a torrent pins; returns the bytes once size and hash match."""
        payload = self._get(f"/torrents/{torrent.info_hash}/state", {}, torrent.session.state_size)
        verify_initial_state(torrent, payload)
        return payload

    def _get(
        self,
        path: str,
        params: dict[str, str] | list[tuple[str, str]] | list[tuple[str, str | bytes]],
        limit: int,
        *,
        sign: Callable[[], dict[str, str]] | None = None,
    ) -> bytes:
        attempt = 0
        while True:
            # %20, not +, for a space: BitTorrent trackers read a raw info-hash byte by byte
            query = urllib.parse.urlencode(
                params if sign is None else sign(), quote_via=urllib.parse.quote
            )
            url = f"{self.base_url}{path}" + (f"?{query}" if query else "")
            try:
                return _fetch(url, timeout=self.timeout, limit=limit)
            except TrackerRefusedError as exc:
                if exc.status not in _RETRYABLE or attempt >= self.retries:
                    raise
                delay = exc.retry_after
            except TrackerError:
                if attempt >= self.retries:
                    raise
                delay = None
            if delay is None:
                delay = self.backoff * 2**attempt * (0.5 + 0.5 * self._rng.random())
            self._sleep(min(delay, self.max_backoff))
            attempt += 1


DOWNLOAD_TIMEOUT_S = 60.0
"""Default seconds for :func:`download_session` (torrent and state together)."""
SHOW_TIMEOUT_S = 10.0
"""Default seconds for :func:`download_torrent`."""


def download_session(url: str, folder: str | Path, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Join a session from a URL: fetch ``url`` (``{tracker}/torrents/{info_hash}``) and its state.

    Both downloads together must end within ``timeout`` seconds (connect, headers and every byte).
    The torrent is read strictly and checked against the info-hash in the URL, and its model
    against the state it pins (:func:`~fedtorrent.net.torrent.check_model_size`); the state
    (``{url}/state``) is streamed to a temporary file (never more than the size the torrent pins)
    and checked against that size and sha256. Only then is it renamed to ``folder/session.state``
    and the torrent written, atomically, as ``folder/session.torrent``; returns the torrent path.

    Raises:
        TrackerRefusedError: an error status. TrackerError: unreachable, too slow, malformed.
        TorrentError: the torrent or the state does not verify.
    """
    deadline = time.monotonic() + timeout
    torrent = _download_torrent(url, deadline)
    check_model_size(torrent.session)  # before a byte of a state sized for a huge model
    state_url = url.split("?", 1)[0].rstrip("/") + "/state"
    path = Path(folder) / "session.torrent"

    def check(size: int, sha256: str) -> None:
        check_initial_state(torrent, size=size, sha256=sha256)

    with _as_tracker_error():
        fetch_to_file(
            state_url,
            state_path_for(path),
            deadline=deadline,
            limit=torrent.session.state_size,
            check=check,
        )
    return write_atomic(path, torrent.to_bytes())


@contextmanager
def _as_tracker_error() -> Iterator[None]:
    """Downloads from a tracker fail as TrackerRefusedError (a status) or TrackerError."""
    try:
        yield
    except HTTPStatusError as exc:
        raise TrackerRefusedError(exc.status, exc.reason, retry_after=exc.retry_after) from None
    except NetworkError as exc:
        if isinstance(exc, TrackerError):
            raise
        raise TrackerError(str(exc)) from None


def _fetch(url: str, *, timeout: float, limit: int) -> bytes:
    """One GET within ``timeout`` seconds in all (connect, headers, body; ``net.download``).

    Raises:
        TrackerRefusedError: an error status (with its ``failure reason`` and ``Retry-After``).
        TrackerError: anything else: unreachable, too slow, malformed HTTP, or too large.
    """
    try:
        return fetch_bytes(url, deadline=time.monotonic() + timeout, limit=limit)
    except HTTPStatusError as exc:
        raise TrackerRefusedError(
            exc.status,
            exc.reason[:300] or "refused",
            retry_after=exc.retry_after,
            json_reason=exc.json_reason,
        ) from None
    except NetworkError as exc:
        raise TrackerError(f"tracker unreachable at {url.partition('?')[0]}: {exc}") from exc


def _maybe_bittorrent(exc: TrackerError) -> bool:
    """Whether our announce failed the way it does at a BitTorrent tracker.

    Such a tracker refuses our 64-digit info-hash (a 4xx status) or answers in bencode (not
    JSON); an unreachable tracker, a retryable status or our own JSON refusal is no sign of one.
    """
    if isinstance(exc, TrackerRefusedError):
        return exc.status not in _RETRYABLE and not exc.json_reason
    return isinstance(exc, _NotJSONError)


def _failure_reason(body: bytes) -> str:
    try:
        reason = json.loads(body).get("failure reason")
    except (ValueError, AttributeError):
        return ""
    return reason[:300] if isinstance(reason, str) else ""


class _NotJSONError(TrackerError):
    """An answer that is not JSON at all (a sign of a BitTorrent tracker, for announces)."""


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _NotJSONError(f"{what} answer is not JSON: {str(exc)[:80]}") from None
    if not isinstance(document, dict):
        raise TrackerError(f"{what} answer is not a JSON object")
    return document


def _count(document: dict[str, Any], key: str, low: int) -> int:
    value = document.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise TrackerError(f"announce answer: {key} must be an integer >= {low}")
    return value


def parse_answer(body: bytes) -> TrackerAnswer:
    """Check a JSON announce answer field by field.

    Raises:
        TrackerError: malformed, or any peer with a bad id, address, port or key.
    """
    document = _json_object(body, "announce")
    peers = document.get("peers")
    if not isinstance(peers, list) or len(peers) > MAX_PEERS_IN_ANSWER:
        raise TrackerError("announce answer: peers must be a list of peers")
    checked = []
    for i, item in enumerate(peers):
        if not isinstance(item, dict):
            raise TrackerError(f"announce answer: peers[{i}] is not an object")
        peer_id, ip, port, pubkey = (item.get(k) for k in ("peer_id", "ip", "port", "pubkey"))
        if not isinstance(peer_id, str) or not PEER_ID.fullmatch(peer_id):
            raise TrackerError(f"announce answer: peers[{i}].peer_id is invalid")
        try:
            ip = str(ipaddress.ip_address(ip)) if isinstance(ip, str) else None
        except ValueError:
            ip = None
        if ip is None:
            raise TrackerError(f"announce answer: peers[{i}].ip is not an IP address")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise TrackerError(f"announce answer: peers[{i}].port is invalid")
        if pubkey is not None:
            try:
                pubkey = parse_pubkey(pubkey) if isinstance(pubkey, str) else None
            except RequestRejected:
                pubkey = None
            if pubkey is None:
                raise TrackerError(f"announce answer: peers[{i}].pubkey is invalid")
        checked.append(PeerAddress(peer_id=peer_id, ip=ip, port=port, pubkey=pubkey))
    return TrackerAnswer(
        interval=_count(document, "interval", 1),
        complete=_count(document, "complete", 0),
        incomplete=_count(document, "incomplete", 0),
        peers=tuple(checked),
        received_at=time.time(),
    )


def download_torrent(url: str, *, timeout: float = SHOW_TIMEOUT_S) -> Torrent:
    """Fetch a torrent from any http(s) URL (e.g. ``{tracker}/torrents/{info_hash}``) and parse it.

    The whole download must end within ``timeout`` seconds; the info-hash in the URL, when the
    last path segment is one, must match the torrent's.

    Raises:
        TrackerRefusedError, TrackerError, TorrentError: as :func:`download_session`.
    """
    return _download_torrent(url, time.monotonic() + timeout)


def _download_torrent(url: str, deadline: float) -> Torrent:
    with _as_tracker_error():
        payload = fetch_bytes(url, deadline=deadline, limit=MAX_TORRENT_BYTES)
    torrent = Torrent.from_bytes(payload)
    last = urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    if is_info_hash(last) and last != torrent.info_hash:
        raise TrackerError(f"{url} served torrent {torrent.info_hash}")
    return torrent
