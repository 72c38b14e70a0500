"""Standard BitTorrent HTTP trackers (BEP 3, BEP 23 compact lists, BEP 7 ``peers6``): query, answer.

Such a tracker knows 20-byte info-hashes and peer ids, and lists addresses without keys. A session's
SHA-256 info-hash is announced truncated to its first 20 bytes (as BEP 52 does), and the peer id as
``-FT0001-`` plus 12 hex digits of its SHA-256, so the same peer always announces the same id. The
port announced is the peer's hello port (``transport.hello_port``): peers found this way introduce
themselves there with a signed hello (``node.hello``) before anyone dials their CurveZMQ socket.

Answers are hostile bytes: the caller bounds their size before :func:`parse_answer` decodes them;
then every field is checked, and any fault is one ``TrackerError`` line. The client
(``tracker.client``) turns a :class:`Listing` into its ``TrackerAnswer``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any

from fedtorrent.errors import TrackerError
from fedtorrent.net.torrent import bdecode

PEER_ID_PREFIX = b"-FT0001-"
MAX_PEERS = 10_000
"""Entries past this many in one answer make it malformed (as in our tracker's JSON answers)."""
_MAX_TEXT = 300


def info_hash_20(info_hash: str) -> bytes:
    """The first 20 bytes of a 64-hex-digit info-hash: what a BitTorrent tracker keys swarms by."""
    return bytes.fromhex(info_hash)[:20]


def peer_id_20(peer_id: str) -> bytes:
    """A 20-byte BitTorrent peer id derived from ours, the same every time."""
    return PEER_ID_PREFIX + hashlib.sha256(peer_id.encode()).hexdigest()[:12].encode()


def announce_query(
    info_hash: str,
    peer_id: str,
    *,
    port: int,
    event: str,
    numwant: int | None,
    uploaded: int,
    downloaded: int,
    ip: str | None,
) -> list[tuple[str, str | bytes]]:
    """The query of one BEP 3 announce with ``compact=1``.

    ``left`` is 0 once the peer ``completed`` its rounds, else 1: a seed to the tracker is a peer
    that has finished (bytes left mean nothing for a model that changes every round).
    """
    query: list[tuple[str, str | bytes]] = [
        ("info_hash", info_hash_20(info_hash)),
        ("peer_id", peer_id_20(peer_id)),
        ("port", str(port)),
        ("uploaded", str(uploaded)),
        ("downloaded", str(downloaded)),
        ("left", "0" if event == "completed" else "1"),
        ("compact", "1"),
    ]
    if event:
        query.append(("event", event))
    if numwant is not None:
        query.append(("numwant", str(numwant)))
    if ip is not None:
        query.append(("ip", ip))
    return query


def address_label(ip: str, port: int) -> str:
    """What stands for a peer's id until its hello names it: ``ip:port`` (``[ip]:port`` for v6).

    Never a real peer id: those hold no ``:`` (``registry.PEER_ID``).
    """
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True)
class Listing:
    """A checked answer: the tracker's ``failure reason`` (then nothing else), or its peers."""

    failure: str | None
    interval: int = 0
    complete: int = 0
    incomplete: int = 0
    addresses: tuple[tuple[str, int], ...] = ()
    """(IP in canonical form, port) of each peer listed, IPv4 first."""


def parse_answer(body: bytes) -> Listing:
    """Check a bencoded announce answer.

    Accepts compact IPv4 (6 bytes each) and dictionary (``ip``, ``port``, optional ``peer id``)
    ``peers`` lists and compact IPv6 ``peers6`` (18 bytes each). ``interval`` is required;
    ``complete`` and ``incomplete`` default to 0.

    Raises:
        TrackerError: anything malformed.
    """
    try:
        document = bdecode(body)
    except (ValueError, TypeError, RecursionError) as exc:
        raise TrackerError(f"announce answer is not bencode: {str(exc)[:80]}") from None
    if not isinstance(document, dict):
        raise TrackerError("announce answer is not a bencoded dictionary")
    failure = document.get(b"failure reason")
    if failure is not None:
        text = failure.decode("utf-8", "replace") if isinstance(failure, bytes) else "?"
        return Listing(failure=_printable(text) or "refused")
    peers = _peers(document.get(b"peers", b""), 4) + _peers(document.get(b"peers6", b""), 16)
    if len(peers) > MAX_PEERS:
        raise TrackerError(f"announce answer lists more than {MAX_PEERS} peers")
    return Listing(
        failure=None,
        interval=_count(document, b"interval", 1, required=True),
        complete=_count(document, b"complete", 0),
        incomplete=_count(document, b"incomplete", 0),
        addresses=tuple(peers),
    )


def _peers(value: object, ip_bytes: int) -> list[tuple[str, int]]:
    """Compact entries (``ip_bytes`` of address, 2 of port) or, for ``peers``, dictionaries."""
    if isinstance(value, list) and ip_bytes == 4:
        if len(value) > MAX_PEERS:
            raise TrackerError(f"announce answer lists more than {MAX_PEERS} peers")
        return [_dictionary_peer(i, item) for i, item in enumerate(value)]
    if not isinstance(value, bytes):
        raise TrackerError("announce answer: peers must be a string or a list")
    size = ip_bytes + 2
    if len(value) % size or len(value) > MAX_PEERS * size:
        raise TrackerError(f"announce answer: compact peers must be {size}-byte entries")
    found = []
    for offset in range(0, len(value), size):
        ip = str(ipaddress.ip_address(value[offset : offset + ip_bytes]))
        port = int.from_bytes(value[offset + ip_bytes : offset + size], "big")
        if port == 0:
            raise TrackerError("announce answer: a compact peer has port 0")
        found.append((ip, port))
    return found


def _dictionary_peer(index: int, item: object) -> tuple[str, int]:
    if not isinstance(item, dict):
        raise TrackerError(f"announce answer: peers[{index}] is not a dictionary")
    raw_ip, port = item.get(b"ip"), item.get(b"port")
    try:
        ip = str(ipaddress.ip_address(raw_ip.decode("ascii"))) if isinstance(raw_ip, bytes) else ""
    except (ValueError, UnicodeDecodeError):
        ip = ""
    if not ip:  # host names are refused: nobody resolves what a tracker says
        raise TrackerError(f"announce answer: peers[{index}].ip is not an IP address")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise TrackerError(f"announce answer: peers[{index}].port is invalid")
    return ip, port


def _count(document: dict[Any, Any], key: bytes, low: int, *, required: bool = False) -> int:
    value = document.get(key)
    if value is None and not required:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 2**31:
        raise TrackerError(f"announce answer: {key.decode()} must be an integer >= {low}")
    return value


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:_MAX_TEXT])
