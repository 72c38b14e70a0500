"""The tracker's directory of swarms, as plain data and functions: no sockets, no SQLite, no clock.

A swarm is the set of live peers of one session (info-hash). Each swarm keeps its peers twice: in an
``OrderedDict`` ordered by last announce, so expiring the silent ones pops from the front in O(1)
each, and in a list, so a random sample of ``numwant`` costs O(numwant) (``random.sample`` over
index positions), never a scan of all peers. Answers are assembled from per-peer pre-encoded JSON
and bencode fragments, so the hot path does little more than validate, update and join bytes.

A peer id that announced an Ed25519 key (64 hex) is bound to it for as long as the swarm exists
(``Swarm.keys``): a later announce that changes its listing (``stopped``, another address, port or
key, or listing it again after it left) must be signed by that key (``sig`` over
``identity.announce_message`` with a fresh ``ts``), else it is refused with 403. Announces that
change nothing need no signature, so the hot path verifies nothing. Each source address may list
at most ``max_peers_per_address`` peer ids per swarm. A bounded per-peer history of (round,
accuracy, bytes) feeds the dashboard's plots.

Changes since the last ``drain_changes`` are remembered so the server can write them behind, in one
SQLite transaction, without the registry knowing about storage.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedtorrent.config import TrackerConfig
from fedtorrent.errors import MessageError, SignatureError, TrackerError
from fedtorrent.net.identity import announce_message, verify_announce
from fedtorrent.net.torrent import bencode

PEER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
EVENTS = {"": "", "empty": "", "started": "started", "stopped": "stopped", "completed": "completed"}
_INT = re.compile(r"[0-9]{1,19}")
_FLOAT = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,3})?")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HEX128 = re.compile(r"[0-9a-fA-F]{128}")
Z85_ALPHABET = (
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
_Z85_VALUE = {c: i for i, c in enumerate(Z85_ALPHABET)}
MAX_ROUND = 10**9
MAX_BYTES_COUNT = 2**63 - 1
ANNOUNCE_PARAMS = frozenset(
    {
        "info_hash", "peer_id", "port", "event", "round", "numwant", "accuracy", "bytes_sent",
        "bytes_received", "pubkey", "ip", "compact", "format", "sig", "ts",
    }
)  # fmt: skip


class RequestRejected(TrackerError):  # noqa: N818  (reads better at raise sites)
    """A request the tracker refuses; ``status`` is the HTTP status it answers with.

    ``kind`` names refusals the tracker counts separately in ``/metrics`` (``unsigned``,
    ``bad_signature``, ``stale``, ``replay``, ``address_cap``); None counts by status only.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        retry_after: float | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.status, self.reason, self.retry_after, self.kind = status, reason, retry_after, kind


@dataclass(frozen=True, slots=True)
class Announce:
    """One validated announce; ``source`` is the address the request came from."""

    info_hash: str
    peer_id: str
    ip: str
    port: int
    source: str
    event: str = ""
    round: int = 0
    numwant: int = 20
    accuracy: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    pubkey: str | None = None
    bencoded: bool = False
    """Answer in bencode (``compact=1`` or ``format=bencode``) rather than JSON."""
    signed_ip: str = ""
    """The ``ip`` parameter in canonical form, ``""`` when not sent (what a signature covers)."""
    sig: bytes | None = None
    """64-byte Ed25519 signature over ``announce_message`` of this announce, if sent."""
    ts: int | None = None
    """The signature's timestamp: microseconds since the Unix epoch."""


@dataclass(slots=True)
class KeyBinding:
    """The Ed25519 key (64 hex) a peer id first announced, and its newest signed ``ts``."""

    pubkey: str
    last_ts: int = 0


@dataclass(slots=True)
class Peer:
    """A live peer as the tracker knows it; times are the registry clock's seconds."""

    peer_id: str
    ip: str
    port: int
    source: str
    pubkey: str | None
    round: int
    accuracy: float | None
    bytes_sent: int
    bytes_received: int
    completed: bool
    first_seen: float
    last_seen: float
    index: int = -1
    """Position in the swarm's sampling list."""
    _json: bytes | None = None
    _bencode: bytes | None = None

    def json_fragment(self) -> bytes:
        """This peer as it appears in a JSON answer (cached: address and key rarely change)."""
        if self._json is None:
            item = {
                "peer_id": self.peer_id,
                "ip": self.ip,
                "port": self.port,
                "pubkey": self.pubkey,
            }
            self._json = json.dumps(item, separators=(",", ":")).encode()
        return self._json

    def bencode_fragment(self) -> bytes:
        """This peer as it appears in a bencoded answer (no ``pubkey`` key when it has none)."""
        if self._bencode is None:
            item: dict[bytes, Any] = {
                b"peer_id": self.peer_id.encode(),
                b"ip": self.ip.encode(),
                b"port": self.port,
            }
            if self.pubkey is not None:
                item[b"pubkey"] = self.pubkey.encode()
            self._bencode = bencode(item)
        return self._bencode

    def to_dict(self) -> dict[str, Any]:
        """Everything public about the peer (its source address stays private)."""
        return {
            "peer_id": self.peer_id,
            "ip": self.ip,
            "port": self.port,
            "pubkey": self.pubkey,
            "round": self.round,
            "accuracy": self.accuracy,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "completed": self.completed,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }


@dataclass(slots=True)
class Swarm:
    """The live peers of one session plus counters that outlive them."""

    info_hash: str
    created: float
    downloaded: int = 0
    """Completed events ever seen (BitTorrent's ``downloaded`` in scrape)."""
    tracker_bytes_in: int = 0
    tracker_bytes_out: int = 0
    announces: int = 0
    by_age: OrderedDict[str, Peer] = field(default_factory=OrderedDict)
    members: list[Peer] = field(default_factory=list)
    complete: int = 0
    """Live peers that sent ``completed``."""
    keys: OrderedDict[str, KeyBinding] = field(default_factory=OrderedDict)
    """Peer id -> its key binding, least recently announced first; outlives the listing."""
    per_source: dict[str, int] = field(default_factory=dict)
    """Source address -> how many live peers it lists."""

    def stats(self) -> dict[str, Any]:
        """JSON statistics: counts, progress and traffic (O(peers), for humans, not announces)."""
        accuracies = [p.accuracy for p in self.members if p.accuracy is not None]
        return {
            "info_hash": self.info_hash,
            "peers": len(self.members),
            "complete": self.complete,
            "incomplete": len(self.members) - self.complete,
            "downloaded": self.downloaded,
            "announces": self.announces,
            "created": self.created,
            "max_round": max((p.round for p in self.members), default=0),
            "mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
            "bytes_sent": sum(p.bytes_sent for p in self.members),
            "bytes_received": sum(p.bytes_received for p in self.members),
            "tracker_bytes_in": self.tracker_bytes_in,
            "tracker_bytes_out": self.tracker_bytes_out,
        }

    def add(self, peer: Peer) -> None:
        """Insert a new peer as the most recently seen."""
        peer.index = len(self.members)
        self.members.append(peer)
        self.by_age[peer.peer_id] = peer
        self.complete += peer.completed
        self.per_source[peer.source] = self.per_source.get(peer.source, 0) + 1

    def remove(self, peer: Peer) -> None:
        """Take a peer out of both orders in O(1)."""
        last = self.members.pop()
        if last is not peer:  # swap the last peer into the hole: O(1) removal
            last.index = peer.index
            self.members[peer.index] = last
        del self.by_age[peer.peer_id]
        self.complete -= peer.completed
        self._forget_source(peer.source)

    def move(self, peer: Peer, source: str) -> None:
        """Count ``peer`` under a new source address."""
        self._forget_source(peer.source)
        peer.source = source
        self.per_source[source] = self.per_source.get(source, 0) + 1

    def _forget_source(self, source: str) -> None:
        left = self.per_source[source] - 1
        if left:
            self.per_source[source] = left
        else:
            del self.per_source[source]


@dataclass(frozen=True, slots=True)
class Answer:
    """What an announce gets back: the re-announce interval and a sample of other live peers."""

    interval: int
    complete: int
    incomplete: int
    peers: list[Peer]

    def to_json(self) -> bytes:
        """``{"complete", "incomplete", "interval", "peers": [{peer_id, ip, port, pubkey}]}``."""
        head = b'{"complete":%d,"incomplete":%d,"interval":%d,"peers":[' % (
            self.complete,
            self.incomplete,
            self.interval,
        )
        return head + b",".join(p.json_fragment() for p in self.peers) + b"]}"

    def to_bencode(self) -> bytes:
        """The same dict bencoded (keys sorted, ``pubkey`` left out when a peer has none)."""
        head = b"d8:completei%de10:incompletei%de8:intervali%de5:peersl" % (
            self.complete,
            self.incomplete,
            self.interval,
        )
        return head + b"".join(p.bencode_fragment() for p in self.peers) + b"ee"


@dataclass(slots=True)
class _Series:
    """One peer's recorded points and when it last announced (the registry clock's seconds)."""

    points: deque[tuple[Any, ...]]
    seen: float = 0.0


@dataclass(frozen=True, slots=True)
class Changes:
    """Rows to write since the last drain: upserted peers, deleted peers, upserted/deleted swarms.

    Peer rows are ``(info_hash, peer_id, ip, port, source, pubkey, round, accuracy, bytes_sent,
    bytes_received, completed, first_seen, last_seen)``; swarm rows are ``(info_hash, created,
    downloaded, tracker_bytes_in, tracker_bytes_out, announces)``; key rows are ``(info_hash,
    peer_id, pubkey, last_ts)``. Deleting a swarm deletes its peers and keys.
    """

    peers: list[tuple[Any, ...]]
    gone_peers: list[tuple[str, str]]
    swarms: list[tuple[Any, ...]]
    gone_swarms: list[str]
    keys: list[tuple[Any, ...]] = field(default_factory=list)
    gone_keys: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.peers
            or self.gone_peers
            or self.swarms
            or self.gone_swarms
            or self.keys
            or self.gone_keys
        )


class SwarmRegistry:
    """All swarms of one tracker; one instance, used from one thread (the event loop)."""

    def __init__(
        self,
        config: TrackerConfig,
        *,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.allow = None if config.allow is None else frozenset(config.allow)
        """A closed tracker's allow-list (``config.allow`` plus the torrents it serves)."""
        self._swarms: dict[str, Swarm] = {}
        self._dirty_peers: dict[tuple[str, str], Peer | None] = {}
        self._dirty_swarms: dict[str, Swarm | None] = {}
        self._dirty_keys: dict[tuple[str, str], KeyBinding | None] = {}
        self._history: OrderedDict[tuple[str, str], _Series] = OrderedDict()
        """(info_hash, peer_id) -> its last ``history_rounds`` points, least recent first."""

    def allow_served(self, info_hashes: Iterable[str]) -> None:
        """A closed tracker also admits the swarms of the torrents it serves."""
        if self.allow is not None:
            self.allow = self.allow | frozenset(info_hashes)

    @property
    def ttl(self) -> float:
        """Seconds of silence after which a peer drops out: two announce intervals."""
        return 2.0 * self.config.interval

    def announce(self, request: Announce) -> Answer:
        """Record one announce and answer with a random sample of the swarm's other live peers.

        Raises:
            RequestRejected: 403 for a closed tracker's unknown info-hash, a full swarm, a source
                address at ``max_peers_per_address``, or a change to a key-bound peer id that is
                not correctly signed; 409 for an unbound peer id held from another address or a
                changed Z85 key; 503 when no swarm slot is free.
        """
        now = self._clock()
        swarm = self._swarms.get(request.info_hash)
        if swarm is None:
            if request.event == "stopped":
                return Answer(self.config.interval, 0, 0, [])
            swarm = self._new_swarm(request.info_hash, now)
        self._expire(swarm, now - self.ttl)
        swarm.announces += 1
        self._dirty_swarms[swarm.info_hash] = swarm
        peer = swarm.by_age.get(request.peer_id)
        if request.event == "stopped" and peer is None:
            return self._empty_answer(swarm)  # nothing listed, nothing to change
        key = swarm.keys.get(request.peer_id)
        if key is not None:
            self._authorize(swarm, peer, key, request, now)
        elif peer is not None:
            if peer.source != request.source:
                raise RequestRejected(
                    409, f"peer_id {request.peer_id!r} is in use from another address"
                )
            if request.pubkey is not None and peer.pubkey not in (None, request.pubkey):
                raise RequestRejected(409, f"peer_id {request.peer_id!r} announced another pubkey")
        if request.event == "stopped":
            assert peer is not None
            swarm.remove(peer)
            self._dirty_peers[(swarm.info_hash, peer.peer_id)] = None
            return self._empty_answer(swarm)
        pubkey = request.pubkey  # omitted: keep the bound or listed key
        if pubkey is None and key is not None:
            pubkey = key.pubkey
        elif pubkey is None and peer is not None:
            pubkey = peer.pubkey
        if peer is None:
            self._admit(swarm, request)
            peer = Peer(
                peer_id=request.peer_id,
                ip=request.ip,
                port=request.port,
                source=request.source,
                pubkey=pubkey,
                round=request.round,
                accuracy=request.accuracy,
                bytes_sent=request.bytes_sent,
                bytes_received=request.bytes_received,
                completed=False,
                first_seen=now,
                last_seen=now,
            )
            swarm.add(peer)
        else:
            if peer.source != request.source:
                swarm.move(peer, request.source)
            if peer.ip != request.ip or peer.port != request.port or peer.pubkey != pubkey:
                peer.ip, peer.port, peer.pubkey = request.ip, request.port, pubkey
                peer._json = peer._bencode = None
            peer.round, peer.accuracy = request.round, request.accuracy
            peer.bytes_sent, peer.bytes_received = request.bytes_sent, request.bytes_received
            peer.last_seen = now
            swarm.by_age.move_to_end(peer.peer_id)
        if key is None and pubkey is not None and len(pubkey) == 64:
            self._bind(swarm, peer.peer_id, pubkey)  # a hex key: Ed25519, so it can sign
        if request.event == "completed" and not peer.completed:
            peer.completed = True
            swarm.complete += 1
            swarm.downloaded += 1
        self._dirty_peers[(swarm.info_hash, peer.peer_id)] = peer
        self._record(swarm.info_hash, peer)
        return Answer(
            interval=self.config.interval,
            complete=swarm.complete,
            incomplete=len(swarm.members) - swarm.complete,
            peers=self._sample(swarm, peer, request.numwant),
        )

    def _empty_answer(self, swarm: Swarm) -> Answer:
        return Answer(self.config.interval, swarm.complete, len(swarm.members) - swarm.complete, [])

    def _admit(self, swarm: Swarm, request: Announce) -> None:
        """Refuse a new listing when the swarm or the sender's share of it is full."""
        if len(swarm.members) >= self.config.max_peers_per_swarm:
            raise RequestRejected(403, f"swarm is full ({self.config.max_peers_per_swarm} peers)")
        cap = self.config.max_peers_per_address
        if cap and swarm.per_source.get(request.source, 0) >= cap:
            raise RequestRejected(
                403,
                f"address {request.source} already lists {cap} peer ids in this swarm "
                "(max_peers_per_address)",
                kind="address_cap",
            )

    def _authorize(
        self, swarm: Swarm, peer: Peer | None, key: KeyBinding, request: Announce, now: float
    ) -> None:
        """Demand a valid signature by the bound key when the announce changes the listing."""
        swarm.keys.move_to_end(request.peer_id)
        new_key = request.pubkey is not None and request.pubkey != key.pubkey
        if not (
            peer is None
            or new_key
            or request.event == "stopped"
            or peer.source != request.source
            or peer.ip != request.ip
            or peer.port != request.port
        ):
            return  # a plain re-announce: nothing to verify on the hot path
        if request.sig is None or request.ts is None:
            raise RequestRejected(
                403,
                f"peer_id {request.peer_id!r} is bound to a key: this change of its listing "
                "must be signed (sig, ts)",
                kind="unsigned",
            )
        window = self.config.signature_window
        if abs(request.ts / 1e6 - now) > window:
            raise RequestRejected(
                403, f"ts is more than {window:g} s from the tracker's clock", kind="stale"
            )
        if request.ts <= key.last_ts:
            raise RequestRejected(
                403,
                "ts is not newer than this peer's last signed change (a replay?)",
                kind="replay",
            )
        try:
            message = announce_message(
                info_hash=request.info_hash,
                peer_id=request.peer_id,
                event=request.event,
                ip=request.signed_ip,
                port=request.port,
                pubkey=request.pubkey or "",
                ts=request.ts,
            )
            verify_announce(key.pubkey, request.sig, message)
        except (SignatureError, MessageError):
            raise RequestRejected(
                403, "sig does not verify against this peer id's key", kind="bad_signature"
            ) from None
        key.last_ts = request.ts
        if new_key:
            assert request.pubkey is not None
            key.pubkey = request.pubkey
        self._dirty_keys[(swarm.info_hash, request.peer_id)] = key

    def _bind(self, swarm: Swarm, peer_id: str, pubkey: str) -> None:
        """Bind ``peer_id`` to ``pubkey``, forgetting the stalest unlisted binding when full."""
        if len(swarm.keys) >= self.config.max_peers_per_swarm:
            stale = next((p for p in swarm.keys if p not in swarm.by_age), None)
            if stale is None:
                return  # every binding is live: the swarm is full anyway
            del swarm.keys[stale]
            self._dirty_keys[(swarm.info_hash, stale)] = None
        key = swarm.keys[peer_id] = KeyBinding(pubkey)
        self._dirty_keys[(swarm.info_hash, peer_id)] = key

    def _record(self, info_hash: str, peer: Peer) -> None:
        """Append (round, accuracy, bytes_sent, bytes_received) to the peer's bounded history.

        A round at or below the last recorded one replaces the points from it on (a re-announce
        of the same round, or a peer restarted from an earlier checkpoint). When ``history_peers``
        series exist, a new peer takes the least recently announced one's place only if that one
        has been silent for a ``ttl``: series that are still growing are never pushed out (by a
        flood of new ids, say), and a swarm larger than the cap costs no churn per announce.
        """
        series_id = (info_hash, peer.peer_id)
        history = self._history
        series = history.get(series_id)
        if series is None:
            if len(history) >= self.config.history_peers:
                stalest = next(iter(history.values()))
                if stalest.seen >= peer.last_seen - self.ttl:
                    return  # every kept series is live: this peer is not plotted
                history.popitem(last=False)
            series = history[series_id] = _Series(deque(maxlen=self.config.history_rounds))
        else:
            history.move_to_end(series_id)
        series.seen = peer.last_seen
        points = series.points
        while points and points[-1][0] >= peer.round:
            points.pop()
        points.append((peer.round, peer.accuracy, peer.bytes_sent, peer.bytes_received))

    def history(self, info_hash: str) -> dict[str, list[tuple[Any, ...]]]:
        """Peer id -> its recorded ``(round, accuracy, bytes_sent, bytes_received)`` points.

        Rounds increase along each list; peers that left keep theirs until evicted. Empty for a
        swarm nobody announced to (or whose history was evicted).
        """
        return {
            peer_id: list(series.points)
            for (swarm_hash, peer_id), series in self._history.items()
            if swarm_hash == info_hash
        }

    def _sample(self, swarm: Swarm, asker: Peer, numwant: int) -> list[Peer]:
        members = swarm.members
        count = min(len(members), numwant + 1)
        picked = [members[i] for i in self._rng.sample(range(len(members)), count)]
        return [p for p in picked if p is not asker][:numwant]

    def _new_swarm(self, info_hash: str, now: float) -> Swarm:
        if self.allow is not None and info_hash not in self.allow:
            raise RequestRejected(403, "info_hash is not served by this closed tracker")
        if len(self._swarms) >= self.config.max_swarms:
            self.expire()
            idle = [s for s in self._swarms.values() if not s.members]
            if not idle:
                raise RequestRejected(503, f"tracker is full ({self.config.max_swarms} swarms)")
            oldest = min(idle, key=lambda s: s.created)
            del self._swarms[oldest.info_hash]
            self._dirty_swarms[oldest.info_hash] = None
            for peer_id in oldest.keys:
                self._dirty_keys[(oldest.info_hash, peer_id)] = None
            for series_id in [k for k in self._history if k[0] == oldest.info_hash]:
                del self._history[series_id]
        swarm = self._swarms[info_hash] = Swarm(info_hash=info_hash, created=now)
        return swarm

    def _expire(self, swarm: Swarm, cutoff: float) -> int:
        removed = 0
        by_age = swarm.by_age
        while by_age:
            oldest = next(iter(by_age.values()))
            if oldest.last_seen >= cutoff:
                break
            swarm.remove(oldest)
            self._dirty_peers[(swarm.info_hash, oldest.peer_id)] = None
            removed += 1
        return removed

    def expire(self) -> int:
        """Drop every peer silent for longer than ``ttl``; returns how many dropped."""
        cutoff = self._clock() - self.ttl
        return sum(self._expire(swarm, cutoff) for swarm in self._swarms.values())

    def swarm(self, info_hash: str) -> Swarm | None:
        """The swarm with only its live peers, or None when the tracker has never seen it."""
        swarm = self._swarms.get(info_hash)
        if swarm is not None:
            self._expire(swarm, self._clock() - self.ttl)
        return swarm

    def swarms(self) -> list[Swarm]:
        """Every known swarm (empty ones too: their counters outlive their peers)."""
        self.expire()
        return list(self._swarms.values())

    def scrape(self, info_hashes: Iterable[str] = ()) -> dict[str, dict[str, int]]:
        """``{info_hash: {complete, incomplete, downloaded}}`` for the given (or all) swarms."""
        wanted = list(info_hashes) or list(self._swarms)
        out = {}
        for info_hash in wanted:
            swarm = self.swarm(info_hash)
            if swarm is not None:
                out[info_hash] = {
                    "complete": swarm.complete,
                    "incomplete": len(swarm.members) - swarm.complete,
                    "downloaded": swarm.downloaded,
                }
        return out

    def count_bytes(self, info_hash: str, *, received: int, sent: int) -> None:
        """Add one request's size and its answer's size to a swarm's tracker traffic."""
        swarm = self._swarms.get(info_hash)
        if swarm is not None:
            swarm.tracker_bytes_in += received
            swarm.tracker_bytes_out += sent
            self._dirty_swarms[info_hash] = swarm

    @property
    def peer_count(self) -> int:
        """Live peers over all swarms (as of the last expiry)."""
        return sum(len(s.members) for s in self._swarms.values())

    def drain_changes(self) -> Changes:
        """Rows changed since the last call, then forget them (the write-behind queue)."""
        peers, gone_peers = [], []
        for (info_hash, peer_id), peer in self._dirty_peers.items():
            if peer is None:
                gone_peers.append((info_hash, peer_id))
            else:
                peers.append(
                    (info_hash, peer.peer_id, peer.ip, peer.port, peer.source, peer.pubkey,
                     peer.round, peer.accuracy, peer.bytes_sent, peer.bytes_received,
                     int(peer.completed), peer.first_seen, peer.last_seen)
                )  # fmt: skip
        swarms, gone_swarms = [], []
        for info_hash, swarm in self._dirty_swarms.items():
            if swarm is None:
                gone_swarms.append(info_hash)
            else:
                swarms.append(
                    (info_hash, swarm.created, swarm.downloaded, swarm.tracker_bytes_in,
                     swarm.tracker_bytes_out, swarm.announces)
                )  # fmt: skip
        keys, gone_keys = [], []
        for (info_hash, peer_id), key in self._dirty_keys.items():
            if key is None:
                gone_keys.append((info_hash, peer_id))
            else:
                keys.append((info_hash, peer_id, key.pubkey, key.last_ts))
        self._dirty_peers, self._dirty_swarms, self._dirty_keys = {}, {}, {}
        return Changes(peers, gone_peers, swarms, gone_swarms, keys, gone_keys)

    def restore(
        self,
        swarms: Iterable[tuple[Any, ...]],
        peers: Iterable[tuple[Any, ...]],
        keys: Iterable[tuple[Any, ...]] = (),
    ) -> None:
        """Load rows in ``Changes`` layout (as the store returns them); expired peers stay out.

        Peers listed with a hex key but without a key row (a database written before key
        bindings existed) are bound to that key.
        """
        for info_hash, created, downloaded, bytes_in, bytes_out, announces in swarms:
            self._swarms[info_hash] = Swarm(
                info_hash=info_hash,
                created=created,
                downloaded=downloaded,
                tracker_bytes_in=bytes_in,
                tracker_bytes_out=bytes_out,
                announces=announces,
            )
        for info_hash, peer_id, pubkey, last_ts in keys:
            swarm = self._swarms.get(info_hash)
            if swarm is not None:
                swarm.keys[peer_id] = KeyBinding(pubkey, last_ts)
        rows = sorted(peers, key=lambda row: row[-1])  # oldest first: the expiry order
        for row in rows:
            info_hash, peer_id, ip, port, source, pubkey, round_, accuracy = row[:8]
            bytes_sent, bytes_received, completed, first_seen, last_seen = row[8:]
            swarm = self._swarms.get(info_hash)
            if swarm is None:
                swarm = self._swarms[info_hash] = Swarm(info_hash=info_hash, created=first_seen)
            swarm.add(
                Peer(
                    peer_id=peer_id,
                    ip=ip,
                    port=port,
                    source=source,
                    pubkey=pubkey,
                    round=round_,
                    accuracy=accuracy,
                    bytes_sent=bytes_sent,
                    bytes_received=bytes_received,
                    completed=bool(completed),
                    first_seen=first_seen,
                    last_seen=last_seen,
                )
            )
            if pubkey is not None and len(pubkey) == 64 and peer_id not in swarm.keys:
                key = swarm.keys[peer_id] = KeyBinding(pubkey)
                self._dirty_keys[(info_hash, peer_id)] = key
        self.expire()


# --- request validation (pure) -------------------------------------------------------------------


def _int_param(value: str, name: str, *, low: int, high: int) -> int:
    if not _INT.fullmatch(value):
        raise RequestRejected(400, f"{name} must be a decimal integer, got {value[:40]!r}")
    number = int(value)
    if not low <= number <= high:
        raise RequestRejected(400, f"{name} must be in [{low}, {high}], got {number}")
    return number


def parse_pubkey(value: str) -> str:
    """A 32-byte Curve25519/Ed25519 public key as 64 hex (lowercased) or 40 Z85 characters.

    Raises:
        RequestRejected: 400 for any other length or alphabet, or Z85 groups that overflow 32 bits.
    """
    if len(value) == 64 and _HEX64.fullmatch(value):
        return value.lower()
    if len(value) == 40 and all(c in _Z85_VALUE for c in value):
        for start in range(0, 40, 5):
            number = 0
            for c in value[start : start + 5]:
                number = number * 85 + _Z85_VALUE[c]
            if number >= 1 << 32:
                raise RequestRejected(400, "pubkey is not valid Z85")
        return value
    raise RequestRejected(400, "pubkey must be 32 bytes as 64 hex or 40 Z85 characters")


def normalize_address(address: str) -> str:
    """An IP literal in canonical form, IPv4-mapped IPv6 turned back into IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _override_ip(value: str, source: str, policy: str) -> str:
    if policy == "never":
        raise RequestRejected(400, "ip is not accepted by this tracker")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise RequestRejected(
            400, "ip must be an IPv4 or IPv6 literal (host names are refused)"
        ) from None
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved or str(ip) == "255.255.255.255":
        raise RequestRejected(400, f"ip {value!r} is not a unicast address")
    if policy == "private":
        sender = ipaddress.ip_address(source)
        if not (sender.is_private or sender.is_loopback):
            raise RequestRejected(400, "ip is only accepted from loopback or private addresses")
    return normalize_address(value)


def parse_announce(
    pairs: Iterable[tuple[str, str]],
    *,
    source: str,
    config: TrackerConfig,
) -> Announce:
    """Validate announce query parameters from ``source`` (the sender's normalized IP).

    ``sig`` and ``ts`` are checked for form only; the registry verifies them when the announce
    changes a key-bound listing.

    Raises:
        RequestRejected: 400 naming the first bad, missing, repeated or unknown parameter.
    """
    query: dict[str, str] = {}
    for name, value in pairs:
        if name not in ANNOUNCE_PARAMS:
            raise RequestRejected(400, f"unknown parameter {name[:40]!r}")
        if name in query:
            raise RequestRejected(400, f"parameter {name} is repeated")
        query[name] = value
    for name in ("info_hash", "peer_id", "port"):
        if name not in query:
            raise RequestRejected(400, f"missing parameter {name}")
    info_hash = query["info_hash"]
    if len(info_hash) != 64 or not _HEX64.fullmatch(info_hash):
        raise RequestRejected(400, "info_hash must be 64 hex characters")
    peer_id = query["peer_id"]
    if not PEER_ID.fullmatch(peer_id):
        raise RequestRejected(400, "peer_id must be 1 to 64 characters from [A-Za-z0-9._-]")
    event = EVENTS.get(query.get("event", ""))
    if event is None:
        raise RequestRejected(400, "event must be started, stopped, completed or empty")
    accuracy = None
    if "accuracy" in query:
        text = query["accuracy"]
        if not _FLOAT.fullmatch(text) or not 0.0 <= float(text) <= 1.0:
            raise RequestRejected(400, f"accuracy must be a decimal in [0, 1], got {text[:40]!r}")
        accuracy = float(text)
    compact = query.get("compact", "0")
    if compact not in ("0", "1"):
        raise RequestRejected(400, "compact must be 0 or 1")
    answer_format = query.get("format", "json")
    if answer_format not in ("json", "bencode"):
        raise RequestRejected(400, "format must be json or bencode")
    numwant = config.numwant
    if "numwant" in query:
        numwant = min(
            _int_param(query["numwant"], "numwant", low=0, high=10**6), config.max_numwant
        )
    sig = ts = None
    if "sig" in query or "ts" in query:
        if "sig" not in query or "ts" not in query:
            raise RequestRejected(400, "sig and ts go together")
        if not _HEX128.fullmatch(query["sig"]):
            raise RequestRejected(400, "sig must be 64 bytes as 128 hex characters")
        sig = bytes.fromhex(query["sig"])
        ts = _int_param(query["ts"], "ts", low=0, high=MAX_BYTES_COUNT)
    signed_ip = _override_ip(query["ip"], source, config.ip_override) if "ip" in query else ""
    return Announce(
        info_hash=info_hash.lower(),
        peer_id=peer_id,
        ip=signed_ip or source,
        port=_int_param(query["port"], "port", low=1, high=65535),
        source=source,
        event=event,
        round=_int_param(query["round"], "round", low=0, high=MAX_ROUND) if "round" in query else 0,
        numwant=numwant,
        accuracy=accuracy,
        bytes_sent=_bytes_param(query, "bytes_sent"),
        bytes_received=_bytes_param(query, "bytes_received"),
        pubkey=parse_pubkey(query["pubkey"]) if "pubkey" in query else None,
        bencoded=compact == "1" or answer_format == "bencode",
        signed_ip=signed_ip,
        sig=sig,
        ts=ts,
    )


def _bytes_param(query: Mapping[str, str], name: str) -> int:
    if name not in query:
        return 0
    return _int_param(query[name], name, low=0, high=MAX_BYTES_COUNT)


def parse_info_hash(value: str) -> str:
    """A path or query info-hash, lowercased.

    Raises:
        RequestRejected: 400 unless 64 hex characters.
    """
    if len(value) != 64 or not _HEX64.fullmatch(value):
        raise RequestRejected(400, "info_hash must be 64 hex characters")
    return value.lower()


class RateLimiter:
    """A token bucket per client address: ``rate`` requests per second, bursts up to ``burst``.

    A ``rate`` of 0 admits everything. Buckets that have refilled completely carry no information
    and are dropped by ``prune``, so memory follows the number of currently busy clients.
    """

    def __init__(self, rate: float, burst: int, *, max_clients: int = 1 << 16) -> None:
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self._buckets: dict[str, list[float]] = {}

    def admit(self, client: str, now: float) -> float:
        """Take one token; returns 0 when admitted, else the seconds until a token is free."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self.prune(now)
            bucket = self._buckets[client] = [float(self.burst), now]
        tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return (1.0 - tokens) / self.rate
        bucket[0] = tokens - 1.0
        return 0.0

    def prune(self, now: float) -> None:
        """Forget clients whose bucket is full again (and everyone, if still over the cap)."""
        full = [
            client
            for client, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate >= self.burst
        ]
        for client in full:
            del self._buckets[client]
        if len(self._buckets) >= self.max_clients:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)
