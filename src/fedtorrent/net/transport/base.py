"""The transport contract every implementation keeps, and the traffic accounting they share.

A transport serves this peer's current state to peers that ask (``publish``) and pulls states
from other peers (``fetch``, ``fetch_many``). It is pull-only on purpose: the receiver decides
what it allocates and when, and a server never waits on a slow client. Lifecycle is explicit:
the constructor only stores settings, ``start`` binds, ``close`` (or leaving a ``with`` block)
stops everything without waiting on peers.

Serving is bounded against floods: each requester (its CurveZMQ key when the link has one, else
the id its request declares) and each connection gets a token bucket (``request_rate``,
``request_burst``; see :class:`RateLimiter`); a request past it is answered
``error: rate_limited`` and counted, nothing more. ``on_served`` hears of each state once per
requester, and of at most ``MAX_LOGGED_REQUESTERS`` requesters per state (the rest as one event
with requester None), so a ledger fed from it grows with rounds, not with requests.

Thread safety: ``publish``, ``fetch``, ``fetch_many`` and ``stats`` may be used from any thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self

import torch

from fedtorrent.errors import ConfigError, FedTorrentError, MessageError, NetworkError
from fedtorrent.net import wire
from fedtorrent.net.wire import Header
from fedtorrent.state.codec import MAX_STATE_BYTES

log = logging.getLogger(__name__)
State = dict[str, torch.Tensor]
_MAX_TRACKED_PEERS = 4096
"""Past this many distinct remote ids, traffic is pooled under ``OTHER`` (ids are self-declared)."""
OTHER = "<other>"
UNKNOWN = "<unknown>"
MAX_LOGGED_REQUESTERS = 256
"""Per served state, ``on_served`` names at most this many requesters; one event with requester
None stands for all the others (a ledger row "sent to everyone")."""


def child_thread_name(role: str) -> str:
    """A name for a thread the current thread starts: ``<current name>/<role>``.

    Several peers may share a process (``node.host``); a peer's log keeps the records of the
    threads whose names start with its own thread's name.
    """
    return f"{threading.current_thread().name}/{role}"


@dataclass(frozen=True)
class TransportConfig:
    """Settings of one peer's transport; validated here, used from ``start``."""

    info_hash: str
    """The session (64 hex chars): requests and replies of other sessions are refused."""
    peer_id: str
    bind: str = "tcp://127.0.0.1:0"
    """Where to listen; port 0 picks a free one (``Transport.address`` tells which)."""
    max_payload_bytes: int = MAX_STATE_BYTES
    piece_bytes: int = 256 << 10
    """A payload travels as pieces of at least this size, at most ``MAX_PIECES`` of them, so the
    receiver hashes one piece while the next is on the wire."""
    max_concurrent_fetches: int = 8
    curve_secret_key: bytes | None = None
    """CurveZMQ key pair (z85, 40 bytes each): when set, every link is encrypted and clients must
    know this peer's public key; fetches use it as the client key too."""
    curve_public_key: bytes | None = None
    curve_allow: frozenset[bytes] | None = None
    """With Curve on: the client keys (z85) the server admits at the handshake (a closed swarm);
    None admits any key (an open swarm). Refused handshakes count as ``not_allowed``."""
    request_rate: float = 50.0
    """Repeated requests per second one requester may make, sustained: asking again for the
    state it was already handed, or before anything is published (a new state is never
    limited). Also the rate of each connection's requests. An honest puller sleeps at least
    ``node.exchange.POLL_FIRST_S`` (0.02 s) after each stale or refused answer, so it never
    repeats faster than this, and one request per connection is all it makes."""
    request_burst: int = 100
    """Requests one requester (or connection) may repeat back to back before ``request_rate``
    applies."""
    max_requesters: int = 1024
    """Distinct requesters and connections whose buckets are kept; the least recently seen is
    forgotten first (and starts with a full bucket again), so memory stays bounded."""
    serve_older: bool = True
    """Answer a request for round ``r`` with an older state when this peer has nothing newer
    (a gossip peer's newest, stale, state). False refuses it with ``error: not_ready`` until
    round ``r`` is published: a central server and its clients (``node.central``), where a
    state of an older round is of no use, so waiting costs a header per poll, not a payload."""

    def __post_init__(self) -> None:
        if not wire.is_info_hash(self.info_hash):
            raise ConfigError(f"info_hash must be 64 lowercase hex chars, got {self.info_hash!r}")
        if not wire.is_peer_id(self.peer_id):
            raise ConfigError(f"peer_id must be 1-128 printable ASCII chars, got {self.peer_id!r}")
        if self.max_payload_bytes < 1:
            raise ConfigError(f"max_payload_bytes must be >= 1, got {self.max_payload_bytes}")
        if self.piece_bytes < 4096:
            raise ConfigError(f"piece_bytes must be >= 4096, got {self.piece_bytes}")
        if self.max_concurrent_fetches < 1:
            raise ConfigError(
                f"max_concurrent_fetches must be >= 1, got {self.max_concurrent_fetches}"
            )
        keys = (self.curve_secret_key, self.curve_public_key)
        if (keys[0] is None) != (keys[1] is None):
            raise ConfigError("curve_secret_key and curve_public_key go together")
        if any(k is not None and len(k) != 40 for k in keys):
            raise ConfigError("CurveZMQ keys must be z85-encoded (40 bytes)")
        if self.curve_allow is not None:
            if self.curve_secret_key is None:
                raise ConfigError("curve_allow needs curve keys")
            if any(not isinstance(k, bytes) or len(k) != 40 for k in self.curve_allow):
                raise ConfigError("curve_allow holds z85-encoded CurveZMQ keys (40 bytes)")
        if not (math.isfinite(self.request_rate) and self.request_rate > 0):
            raise ConfigError(f"request_rate must be a number > 0, got {self.request_rate}")
        if self.request_burst < 1:
            raise ConfigError(f"request_burst must be >= 1, got {self.request_burst}")
        if self.max_requesters < 16:
            raise ConfigError(f"max_requesters must be >= 16, got {self.max_requesters}")


@dataclass(frozen=True)
class Endpoint:
    """A remote peer as the tracker lists it."""

    peer_id: str
    address: str
    public_key: bytes | None = None
    """Its CurveZMQ public key (z85), required when that peer's links are encrypted."""
    base: int | None = None
    """The round of that peer's public copy the asker holds (compressed sessions), sent with the
    request so the peer can answer with the updates since then instead of the whole copy."""


@dataclass(frozen=True)
class Reply:
    """A state that arrived intact: header checked, payload length and sha256 verified.

    ``state`` holds the decoded tensors when the fetch was given ``like_state``, else None.
    """

    peer_id: str
    header: Header
    payload: memoryview = field(repr=False)
    rtt_s: float
    state: State | None = field(default=None, repr=False)
    finite: frozenset[str] = field(default=frozenset(), repr=False)
    """Float tensors the transport already found finite while receiving (``wire.FiniteScan``)."""


@dataclass
class FetchResult:
    """What a cohort fetch produced by its deadline: every asked peer is in exactly one dict."""

    replies: dict[str, Reply] = field(default_factory=dict)
    failures: dict[str, FedTorrentError] = field(default_factory=dict)


@dataclass
class _Flow:
    header_sent: int = 0
    payload_sent: int = 0
    header_received: int = 0
    payload_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0

    def add(self, other: _Flow) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class TrafficStats:
    """Bytes per remote peer and round, payload and header apart, plus round trips and rejections.

    Counts application bytes (frame contents), not ZMTP or TCP framing. ``round`` is always this
    peer's own round: the one it fetched in, or the round of the state it was serving.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flows: dict[tuple[str, int], _Flow] = {}
        self._rtts: dict[str, list[tuple[int, float]]] = {}
        self._rejections: dict[str, Counter[str]] = {}
        self._failures: dict[str, Counter[str]] = {}
        self._serving: Counter[str] = Counter()
        self._known: set[str] = set()

    def _peer(self, peer: str) -> str:
        if peer not in self._known:
            if len(self._known) >= _MAX_TRACKED_PEERS:
                return OTHER
            self._known.add(peer)
        return peer

    def record_sent(self, peer: str, round: int, *, header: int, payload: int = 0) -> None:
        """Count one message sent to ``peer``."""
        with self._lock:
            flow = self._flows.setdefault((self._peer(peer), round), _Flow())
            flow.header_sent += header
            flow.payload_sent += payload
            flow.messages_sent += 1

    def record_received(self, peer: str, round: int, *, header: int, payload: int = 0) -> None:
        """Count one message (or the part of it that arrived) received from ``peer``."""
        with self._lock:
            flow = self._flows.setdefault((self._peer(peer), round), _Flow())
            flow.header_received += header
            flow.payload_received += payload
            flow.messages_received += 1

    def record_rtt(self, peer: str, round: int, seconds: float) -> None:
        """Request sent to full payload received, for one successful fetch."""
        with self._lock:
            self._rtts.setdefault(self._peer(peer), []).append((round, seconds))

    def record_rejection(self, peer: str, reason: str) -> None:
        """A message from ``peer`` failed a check (``reason`` from ``wire.REASONS``)."""
        with self._lock:
            self._rejections.setdefault(self._peer(peer), Counter())[reason] += 1

    def record_failure(self, peer: str, kind: str) -> None:
        """A fetch from ``peer`` failed without a bad message: ``timeout``, ``refused:<why>``."""
        with self._lock:
            self._failures.setdefault(self._peer(peer), Counter())[kind] += 1

    def record_serving(self, kind: str) -> None:
        """Count one hand-out under ``kind`` (``served``, ``repeat`` or ``pooled``)."""
        with self._lock:
            self._serving[kind] += 1

    def rejections(self) -> Counter[str]:
        """Rejected messages by reason, all peers together."""
        with self._lock:
            return sum(self._rejections.values(), Counter())

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: totals, per peer, per round, round trips, rejections, failures.

        ``serving`` counts states handed out (``served``), and of those the ones to a requester
        that had it already (``repeat``) or to requesters past ``MAX_LOGGED_REQUESTERS``
        (``pooled``), which ``on_served`` hears of at most once per state.
        """
        with self._lock:
            total, per_peer, per_round = _Flow(), dict[str, _Flow](), dict[int, _Flow]()
            for (peer, round), flow in self._flows.items():
                total.add(flow)
                per_peer.setdefault(peer, _Flow()).add(flow)
                per_round.setdefault(round, _Flow()).add(flow)
            return {
                "totals": vars(total),
                "per_peer": {p: vars(f) for p, f in sorted(per_peer.items())},
                "per_round": {str(r): vars(f) for r, f in sorted(per_round.items())},
                "per_peer_round": [
                    {"peer": p, "round": r, **vars(f)} for (p, r), f in sorted(self._flows.items())
                ],
                "rtt_s": {p: [list(x) for x in v] for p, v in sorted(self._rtts.items())},
                "rejections": dict(sum(self._rejections.values(), Counter())),
                "rejections_per_peer": {p: dict(c) for p, c in sorted(self._rejections.items())},
                "failures": {p: dict(c) for p, c in sorted(self._failures.items())},
                "serving": {k: self._serving[k] for k in ("served", "repeat", "pooled")},
            }


@dataclass(frozen=True)
class Served:
    """The state a peer currently serves: its checked header and its two frames.

    ``variants`` are the same round's compressed updates by the base round they apply to: a
    request carrying one of those bases gets that variant instead (``Transport.publish``).
    """

    header: Header
    frames: tuple[bytes, bytes]
    variants: Mapping[int, Served] = field(default_factory=dict)


@dataclass(frozen=True)
class ServedEvent:
    """One state handed to a requester (what the sender's ledger records).

    ``requester`` is the id the request declared, or None for every requester of this state past
    the first ``MAX_LOGGED_REQUESTERS``; ``num_bytes`` counts header and payload.
    """

    requester: str | None
    header: Header
    num_bytes: int


OnServed = Callable[[ServedEvent], None]
"""Called from the serving thread once per state and requester; must be quick and thread-safe."""


@dataclass
class _Bucket:
    tokens: float
    refilled_at: float
    handed: tuple[tuple[int, str], ...] = ()
    """The last states (round, digest) this requester was handed: at most the two served."""


class RateLimiter:
    """Token buckets for requesters and connections: ``rate`` a second, bursts of ``burst``.

    A requester's first request for a state it was not handed yet is free; asking again for the
    state it has (or before anything is published) takes a token from its bucket. Every request
    takes one from its connection's bucket. At most ``max_keys`` buckets are kept; the least
    recently used is forgotten first and starts full if its key comes back. Thread-safe.
    """

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        max_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate, self._burst, self._max_keys, self._clock = rate, float(burst), max_keys, clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        """Key -> its bucket, least recently used first."""

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(
        self, requester: str, *, connection: str | None = None, state: tuple[int, str] | None
    ) -> bool:
        """Admit one request for ``state`` (round, digest; None: nothing to serve) or refuse it.

        A refused request takes no token.
        """
        now = self._clock()
        with self._lock:
            own = self._refilled(f"requester:{requester}", now)
            cost = [(own, 0.0 if state is not None and state not in own.handed else 1.0)]
            if connection is not None:
                cost.append((self._refilled(f"connection:{connection}", now), 1.0))
            if any(bucket.tokens < need for bucket, need in cost):
                return False
            for bucket, need in cost:
                bucket.tokens -= need
            if state is not None and state not in own.handed:
                own.handed = (*own.handed, state)[-2:]
            return True

    def _refilled(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self._burst, now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
            return bucket
        self._buckets.move_to_end(key)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.refilled_at) * self._rate)
        bucket.refilled_at = now
        return bucket


class _ReportedOnce:
    """Which requesters ``on_served`` heard of, for the latest state and the one before it.

    Both can be handed out (see :meth:`Transport.answer`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: OrderedDict[tuple[int, str], tuple[set[str], list[bool]]] = OrderedDict()
        """(round, digest) -> the requesters named for it, and whether a pooled report went."""

    def requester(self, requester: str, header: Header) -> tuple[bool, str | None]:
        """``(report, as_whom)``: report this hand-out, and under which requester (None: pooled)."""
        with self._lock:
            state = (header.round, header.payload_sha256)
            if state not in self._states:  # a newer state: nobody has had it yet
                self._states[state] = (set(), [False])
                while len(self._states) > 2:
                    self._states.popitem(last=False)
            named, pooled = self._states[state]
            if requester in named:
                return False, requester
            if len(named) < MAX_LOGGED_REQUESTERS:
                named.add(requester)
                return True, requester
            first_pooled, pooled[0] = not pooled[0], True
            return first_pooled, None


class Transport(ABC):
    """Serve one state, fetch others; subclasses provide ``_start``, ``_close``, ``_fetch``."""

    def __init__(self, config: TransportConfig) -> None:
        self.config = config
        self.stats = TrafficStats()
        self._served: Served | None = None
        self._previous: Served | None = None
        """The state published before ``_served``: what a requester one round behind gets."""
        self._executor: ThreadPoolExecutor | None = None
        self._closing = threading.Event()
        self._leaving = False
        self._lifecycle = threading.Lock()
        self._limiter = RateLimiter(
            rate=config.request_rate, burst=config.request_burst, max_keys=config.max_requesters
        )
        self._reported = _ReportedOnce()
        self.on_served: OnServed | None = None
        """Set before ``start`` to learn of the states served (see :class:`ServedEvent`)."""
        self._hello: list[bytes] | None = None
        """This peer's signed hello (``introduce``), answered on the hello socket."""

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    @abstractmethod
    def address(self) -> str:
        """Where peers reach this transport; valid after ``start``."""

    def start(self) -> None:
        """Bind and begin serving. Raises NetworkError if the address cannot be bound."""
        with self._lifecycle:
            if self._executor is not None:
                raise NetworkError("transport already started")
            if self._closing.is_set():
                raise NetworkError("a closed transport cannot start again")
            self._start()
            self._executor = ThreadPoolExecutor(
                self.config.max_concurrent_fetches, thread_name_prefix=child_thread_name("fetch")
            )

    def close(self) -> None:
        """Stop serving and abort fetches in flight; returns promptly, safe to call twice."""
        with self._lifecycle:
            if self._closing.is_set():
                return
            self._closing.set()
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
            self._close()

    def leave(self) -> None:
        """Answer every request from now on with ``error: gone``: this peer is leaving.

        Neighbours waiting for its next state stop at once instead of polling until their
        deadline (``node.exchange`` ends a pull on ``refused:gone``). Only sets a flag, so it is
        safe from a signal handler; :meth:`close` still stops serving.
        """
        self._leaving = True

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @abstractmethod
    def _start(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    # -- serving ------------------------------------------------------------------------------

    def publish(
        self, frames: Sequence[bytes], *, variants: Mapping[int, Sequence[bytes]] | None = None
    ) -> None:
        """Serve these ``wire.encode_message`` frames from now on (replaces the previous state).

        The previous state is kept for requesters still in its round (see :meth:`answer`).
        ``variants`` maps a base round to the frames of this round's compressed updates from
        that base (``codec`` and ``base`` set, the same round): a request holding that base gets
        them instead of ``frames``.

        Raises:
            ConfigError: the frames are not a state message of this session and peer.
        """
        served = self._checked(frames)
        extra: dict[int, Served] = {}
        for base, variant in (variants or {}).items():
            checked = self._checked(variant)
            if checked.header.base != base or checked.header.round != served.header.round:
                raise ConfigError(f"cannot publish: variant for base {base} says otherwise")
            extra[base] = checked
        self._previous = self._served
        self._served = replace(served, variants=extra)
        self._on_publish(self._served)

    def _checked(self, frames: Sequence[bytes]) -> Served:
        if len(frames) != 2:
            raise ConfigError(f"publish takes [header, payload] frames, got {len(frames)}")
        header_raw, payload = bytes(frames[0]), frames[1]
        try:
            header = wire.decode_header(
                header_raw,
                info_hash=self.config.info_hash,
                max_payload_bytes=self.config.max_payload_bytes,
            )
        except MessageError as exc:
            raise ConfigError(f"cannot publish: {exc}") from None
        if header.kind != "state" or header.sender != self.config.peer_id:
            raise ConfigError("cannot publish: not a state message sent by this peer")
        if len(payload) != header.payload_len:
            raise ConfigError("cannot publish: payload length differs from the header")
        return Served(header=header, frames=(header_raw, payload))

    def _on_publish(self, served: Served) -> None:  # noqa: B027 (optional hook)
        """Hook: precompute whatever serving needs (the ZeroMQ transport cuts pieces)."""

    @property
    def serving_round(self) -> int:
        """Round of the state being served; 0 before the first ``publish``."""
        served = self._served
        return served.header.round if served is not None else 0

    def answer(
        self,
        request: Sequence[Any],
        *,
        client_key: str | None = None,
        connection: str | None = None,
    ) -> tuple[Served | None, list[bytes], str]:
        """Server side of one request: the state to send, or error frames; counts the traffic.

        Args:
            request: the request's frames.
            client_key: the CurveZMQ key the link authenticated, if any; it names the requester
                for rate limiting (else the id the request declares does).
            connection: what tells this request's connection apart, if anything; limited too.

        Returns:
            ``(served, [], requester)`` to send ``served`` (the state of the requester's
            round when the previous publish was that round, else the latest; then call
            :meth:`report_served` once it went out), or ``(None, error_frames, requester)``;
            a requester over its rate gets ``error: rate_limited`` (a ``rate_limited``
            rejection in ``stats``). Without ``serve_older``, a request for a round past every
            state published gets ``error: not_ready``.
        """
        served = self._served
        round = served.header.round if served is not None else 0
        request_bytes = sum(len(memoryview(f)) for f in request if not isinstance(f, str))
        try:
            header = wire.decode_request(request, info_hash=self.config.info_hash)
        except MessageError as exc:
            log.debug("refused a request: %s", exc)
            self.stats.record_received(UNKNOWN, round, header=request_bytes)
            self.stats.record_rejection(UNKNOWN, exc.reason)
            return None, self._error(UNKNOWN, round, exc.reason), UNKNOWN
        self.stats.record_received(header.sender, round, header=request_bytes)
        if self._leaving:  # a graceful leave: the requester stops waiting for this peer now
            return None, self._error(header.sender, round, "gone"), header.sender
        previous = self._previous
        if (
            served is not None
            and previous is not None
            and header.round == previous.header.round < served.header.round
        ):
            # A requester one round behind gets that round's state, as in the simulator's
            # lockstep rounds, not the newer one it would mix a round early.
            served = previous
        if (
            served is not None
            and not self.config.serve_older
            and served.header.round < header.round
        ):
            served = None  # nothing of the round asked for yet: not_ready
        if served is not None and header.base is not None and header.base in served.variants:
            served = served.variants[header.base]  # the updates since the copy it holds
        elif served is not None and header.base is not None and header.base >= served.header.round:
            served = None  # it holds this state already: not_ready, not the whole state again
        state = (served.header.round, served.header.payload_sha256) if served else None
        requester = f"curve:{client_key}" if client_key else f"id:{header.sender}"
        if not self._limiter.allow(requester, connection=connection, state=state):
            self.stats.record_rejection(header.sender, "rate_limited")
            return None, self._error(header.sender, round, "rate_limited"), header.sender
        if served is None:
            return None, self._error(header.sender, round, "not_ready"), header.sender
        header_raw, payload = served.frames
        self.stats.record_sent(header.sender, round, header=len(header_raw), payload=len(payload))
        return served, [], header.sender

    def report_served(self, requester: str, served: Served) -> None:
        """Count that ``served`` went out to ``requester``; tell ``on_served`` if it is news.

        ``on_served`` hears of each (state, requester) once, and of at most
        ``MAX_LOGGED_REQUESTERS`` requesters per state, then once more with requester None.
        """
        self.stats.record_serving("served")
        report, as_whom = self._reported.requester(requester, served.header)
        if as_whom is None:
            self.stats.record_serving("pooled")
        elif not report:
            self.stats.record_serving("repeat")
        hook = self.on_served
        if report and hook is not None:
            size = len(served.frames[0]) + len(served.frames[1])
            hook(ServedEvent(requester=as_whom, header=served.header, num_bytes=size))

    def _error(self, peer: str, round: int, reason: str) -> list[bytes]:
        frames = wire.encode_error(
            info_hash=self.config.info_hash, sender=self.config.peer_id, round=round, reason=reason
        )
        self.stats.record_sent(peer, round, header=len(frames[0]))
        return frames

    # -- hellos -------------------------------------------------------------------------------

    @property
    def hello_port(self) -> int | None:
        """The TCP port of the plain socket that answers hellos (None: this transport has none).

        What a peer announces to a standard BitTorrent tracker, which carries no keys.
        """
        return None

    def introduce(self, frames: Sequence[bytes]) -> None:
        """Answer hello requests with these ``identity.signed_hello`` frames from now on.

        Raises:
            ConfigError: not a hello of this session and peer.
        """
        try:
            header = wire.decode_single(frames, info_hash=self.config.info_hash, kind="hello")
        except MessageError as exc:
            raise ConfigError(f"cannot introduce: {exc}") from None
        if header.sender != self.config.peer_id:
            raise ConfigError("cannot introduce: a hello sent by another peer")
        self._hello = [bytes(frames[0])]

    def answer_hello(self, request: Sequence[Any], *, connection: str) -> list[bytes]:
        """Server side of one hello request: this peer's hello, or error frames; counts it.

        Rate-limited like state requests (each one takes a token: a hello never changes), and
        ``not_ready`` before :meth:`introduce`.
        """
        round = self.serving_round
        request_bytes = sum(len(memoryview(f)) for f in request if not isinstance(f, str))
        try:
            header = wire.decode_single(
                request, info_hash=self.config.info_hash, kind="hello_request"
            )
        except MessageError as exc:
            self.stats.record_received(UNKNOWN, round, header=request_bytes)
            self.stats.record_rejection(UNKNOWN, exc.reason)
            return self._error(UNKNOWN, round, exc.reason)
        self.stats.record_received(header.sender, round, header=request_bytes)
        if not self._limiter.allow(f"hello:{header.sender}", connection=connection, state=None):
            self.stats.record_rejection(header.sender, "rate_limited")
            return self._error(header.sender, round, "rate_limited")
        hello = self._hello
        if hello is None:
            return self._error(header.sender, round, "not_ready")
        self.stats.record_sent(header.sender, round, header=len(hello[0]))
        return hello

    def hello(self, address: str, *, timeout: float) -> Header:
        """Ask whatever listens at ``address`` (a hello socket) to introduce itself.

        Returns the decoded ``hello`` header of this session; its signature is not checked here
        (``identity.verify_hello`` does that). Traffic and rejections count under ``address``.

        Raises:
            MessageError: the answer failed a check (counted).
            NetworkError: no answer within ``timeout`` seconds, a refusal, or no hello support.
        """
        if self._executor is None or self._closing.is_set():
            raise NetworkError("transport is not running")
        request = wire.encode_hello_request(
            info_hash=self.config.info_hash, sender=self.config.peer_id
        )
        self.stats.record_sent(address, 0, header=len(request[0]))
        try:
            frames = self._hello_exchange(address, request, time.monotonic() + timeout)
            self.stats.record_received(address, 0, header=sum(len(f) for f in frames))
            if len(frames) == 1:
                header = wire.decode_header(frames[0], info_hash=self.config.info_hash)
                if header.kind == "error":
                    raise PeerRefusedError(address, header.reason)
            return wire.decode_single(frames, info_hash=self.config.info_hash, kind="hello")
        except MessageError as exc:
            self.stats.record_rejection(address, exc.reason)
            raise
        except NetworkError as exc:
            self.stats.record_failure(address, getattr(exc, "kind", "unreachable"))
            raise

    def _hello_exchange(self, address: str, request: list[bytes], deadline: float) -> list[bytes]:
        """Send ``request`` to a hello socket; return the answer's frames (one when well formed)."""
        raise NetworkError(f"{type(self).__name__} cannot ask {address} for a hello")

    # -- fetching -----------------------------------------------------------------------------

    def fetch(
        self,
        endpoint: Endpoint,
        *,
        round: int,
        timeout: float,
        like_state: Mapping[str, torch.Tensor] | None = None,
    ) -> Reply:
        """Ask one peer for its state and wait at most ``timeout`` seconds.

        Args:
            endpoint: the peer to ask.
            round: this peer's round (sent with the request, used for accounting).
            timeout: seconds; a dead or silent peer costs exactly this much.
            like_state: when given, the payload is decoded and checked against it.

        Raises:
            MessageError: the reply failed a check (counted in ``stats`` by reason).
            NetworkError: no reply in time, the peer refused, or the transport is closed.
        """
        return self._fetch_until(endpoint, round, time.monotonic() + timeout, like_state)

    def fetch_many(
        self,
        endpoints: Iterable[Endpoint],
        *,
        round: int,
        timeout: float,
        like_state: Mapping[str, torch.Tensor] | None = None,
    ) -> FetchResult:
        """Ask a cohort concurrently; return what arrived within ``timeout`` seconds, no barrier.

        Peers that do not answer in time appear in ``failures`` with a NetworkError.
        """
        executor = self._executor
        if executor is None or self._closing.is_set():
            raise NetworkError("transport is not running")
        cohort = list(endpoints)
        if len({e.peer_id for e in cohort}) != len(cohort):
            raise ConfigError("fetch_many got the same peer_id twice")
        deadline = time.monotonic() + timeout
        futures: dict[Future[Reply], Endpoint] = {
            executor.submit(self._fetch_until, e, round, deadline, like_state): e for e in cohort
        }
        wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        result = FetchResult()
        for future, endpoint in futures.items():
            if not future.done():
                if future.cancel():  # never started; one still running records its own outcome
                    self.stats.record_failure(endpoint.peer_id, "timeout")
                result.failures[endpoint.peer_id] = FetchTimeoutError(
                    f"peer {endpoint.peer_id} did not answer before the deadline"
                )
            elif isinstance(error := future.exception(), FedTorrentError):
                result.failures[endpoint.peer_id] = error
            elif error is not None:
                raise error
            else:
                result.replies[endpoint.peer_id] = future.result()
        return result

    def _fetch_until(
        self,
        endpoint: Endpoint,
        round: int,
        deadline: float,
        like_state: Mapping[str, torch.Tensor] | None,
    ) -> Reply:
        if self._executor is None or self._closing.is_set():
            raise NetworkError("transport is not running")
        try:
            reply = self._fetch(endpoint, round, deadline)
            if like_state is not None and reply.header.codec is None:  # compressed: caller decodes
                state = wire.decode_payload(
                    reply.payload, like_state=like_state, finite=reply.finite
                )
                reply = replace(reply, state=state)
        except MessageError as exc:
            log.warning("rejected the reply of peer %s: %s", endpoint.peer_id, exc)
            self.stats.record_rejection(endpoint.peer_id, exc.reason)
            raise
        except NetworkError as exc:
            self.stats.record_failure(endpoint.peer_id, getattr(exc, "kind", "unreachable"))
            raise
        self.stats.record_rtt(endpoint.peer_id, round, reply.rtt_s)
        return reply

    @abstractmethod
    def _fetch(self, endpoint: Endpoint, round: int, deadline: float) -> Reply:
        """Request, receive and verify (header, length, sha256) one state; count the bytes."""

    def check_reply_header(self, endpoint: Endpoint, raw: bytes | memoryview) -> Header:
        """Client side: the first frame of a reply must be a state header from ``endpoint``.

        Raises:
            MessageError: a bad header, or a state from another sender.
            NetworkError: the peer answered with an error (``kind`` ``refused:<reason>``).
        """
        header = wire.decode_header(
            raw, info_hash=self.config.info_hash, max_payload_bytes=self.config.max_payload_bytes
        )
        if header.kind == "error":
            raise PeerRefusedError(endpoint.peer_id, header.reason)
        if header.kind != "state":
            raise wire.reject("bad_header", f"expected a state reply, got {header.kind!r}")
        if header.sender != endpoint.peer_id:
            raise wire.reject(
                "wrong_sender", f"asked {endpoint.peer_id!r}, answered by {header.sender!r}"
            )
        return header


class PeerRefusedError(NetworkError):
    """The peer answered, but with an error instead of its state (e.g. ``not_ready``)."""

    def __init__(self, peer_id: str, reason: str) -> None:
        super().__init__(f"peer {peer_id} refused the request: {reason}")
        self.kind = f"refused:{reason}"


class FetchTimeoutError(NetworkError):
    """No complete reply before the deadline."""

    kind = "timeout"


class PeerUnreachableError(NetworkError):
    """The link failed before a reply: ``kind`` ``unreachable`` or ``handshake_failed``.

    ``unreachable``: the connection was refused (nothing listens at the address);
    ``handshake_failed``: the CurveZMQ handshake failed (a wrong key, or not CurveZMQ at all).
    """

    def __init__(self, peer_id: str, kind: str) -> None:
        super().__init__(f"peer {peer_id} is unreachable ({kind})")
        self.kind = kind
