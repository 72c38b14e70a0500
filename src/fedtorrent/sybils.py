"""A sybil flood for experiments and tests: many fake peer ids announced to a live tracker.

Each fake announces with its own Ed25519 key (derived from its id, so a re-announce keeps it; a
real key passes every check a peer makes before dialling) and a port where nothing listens, from
one of several loopback source addresses (the HTTP client binds them; Linux routes all of
``127.0.0.0/8`` to loopback). Only loopback sources are accepted: a test harness, not a tool.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import socket
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedtorrent.errors import ConfigError


@dataclass(frozen=True)
class FloodResult:
    """How the tracker answered the fakes: HTTP status -> count, and the ids it accepted."""

    statuses: Counter[int] = field(default_factory=Counter)
    accepted: list[str] = field(default_factory=list)


def loopback_sources(count: int) -> list[str]:
    """``127.0.0.2`` ... : ``count`` loopback addresses other than ``127.0.0.1``."""
    if not 1 <= count <= 250:
        raise ConfigError(f"between 1 and 250 loopback sources, got {count}")
    return [f"127.0.0.{2 + i}" for i in range(count)]


def closed_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def announce_fakes(
    announce_url: str,
    info_hash: str,
    *,
    count: int,
    sources: Sequence[str],
    prefix: str = "fake",
    port: int | None = None,
    event: str = "started",
    timeout: float = 5.0,
) -> FloodResult:
    """Announce ``count`` fake peers (``<prefix>-<i>``) round-robin over ``sources``.

    ``port`` is where the fakes claim to listen (default: one where nothing listens now); call
    again with ``event=""`` to keep them listed past the tracker's expiry.

    Raises:
        ConfigError: a source is not a loopback address, or the URL is not ``http://``.
    """
    from fedtorrent.net.identity import PeerIdentity  # noqa: PLC0415

    url = urllib.parse.urlsplit(announce_url)
    if url.scheme != "http" or url.hostname is None:
        raise ConfigError(f"an http:// announce URL, got {announce_url!r}")
    if not sources or not all(ipaddress.ip_address(s).is_loopback for s in sources):
        raise ConfigError("fakes announce from loopback addresses only")
    port = closed_port() if port is None else port
    result = FloodResult()
    for i in range(count):
        source = sources[i % len(sources)]
        query = urllib.parse.urlencode(
            {
                "info_hash": info_hash,
                "peer_id": f"{prefix}-{i}",
                "port": str(port),
                "pubkey": PeerIdentity.from_seed(_seed(f"{prefix}-{i}")).public_key_hex,
                "numwant": "0",
                **({"event": event} if event else {}),
            }
        )
        connection = http.client.HTTPConnection(
            url.hostname, url.port or 80, timeout=timeout, source_address=(source, 0)
        )
        try:
            connection.request("GET", f"{url.path}?{query}")
            response = connection.getresponse()
            response.read()
            result.statuses[response.status] += 1
            if response.status == 200:
                result.accepted.append(f"{prefix}-{i}")
        except OSError:
            result.statuses[0] += 1  # refused, reset or timed out: the tracker cut it off
        finally:
            connection.close()
    return result


def _seed(name: str) -> bytes:
    return hashlib.sha256(f"fedtorrent-sybil:{name}".encode()).digest()
