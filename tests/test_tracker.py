"""The HTTP tracker, run for real on 127.0.0.1 with many simulated announcers.

Time is a fake clock handed to the tracker, so expiry and rate limits are exact and nothing waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import fastbencode
import pytest

from fedtorrent.config import DataConfig, MixingConfig, ModelConfig, TrackerConfig, TrainConfig
from fedtorrent.errors import ConfigError
from fedtorrent.net.identity import PeerIdentity, announce_message
from fedtorrent.net.torrent import Session, Torrent, save_torrent, state_path_for
from fedtorrent.net.tracker.client import TrackerClient
from fedtorrent.net.tracker.registry import (
    Announce,
    RateLimiter,
    RequestRejected,
    SwarmRegistry,
    parse_pubkey,
)
from fedtorrent.net.tracker.server import BackgroundTracker, TrackerServer

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]

SWARM = "a" * 64
OTHER = "b" * 64
HEX_KEY = "0f" * 32
Z85_KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Tracker:
    """A started TrackerServer plus an HTTP session pointed at it."""

    def __init__(self, server: TrackerServer, http: aiohttp.ClientSession) -> None:
        self.server, self.http = server, http

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        query = {k: str(v) for k, v in params.items()}
        async with self.http.get(self.server.url + path, params=query) as response:
            body = await response.read()
            kind = response.content_type
        return response.status, json.loads(body) if kind == "application/json" else body

    async def announce(self, peer_id: str, info_hash: str = SWARM, **params: Any) -> Any:
        params.setdefault("port", 7000 + sum(map(ord, peer_id)) % 1000)
        status, body = await self.get("/announce", info_hash=info_hash, peer_id=peer_id, **params)
        assert status == 200, body
        return body


@asynccontextmanager
async def running(config: TrackerConfig | None = None, **kwargs: Any) -> AsyncIterator[Tracker]:
    config = config or TrackerConfig(port=0, rate_limit=0, max_peers_per_address=0)
    kwargs.setdefault("rng", random.Random(7))
    server = TrackerServer(config, **kwargs)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Tracker(server, http)
    finally:
        await server.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def ids(answer: dict[str, Any]) -> set[str]:
    return {p["peer_id"] for p in answer["peers"]}


def test_many_announcers_join_and_never_see_themselves() -> None:
    async def scenario() -> None:
        async with running() as t:
            joined: set[str] = set()
            for i in range(60):
                answer = await t.announce(f"peer-{i}", event="started", numwant=50)
                assert f"peer-{i}" not in ids(answer)
                assert ids(answer) <= joined
                assert len(answer["peers"]) == min(len(joined), 50)
                assert answer["interval"] == 30
                joined.add(f"peer-{i}")
            status, swarm = await t.get(f"/swarms/{SWARM}")
            assert status == 200 and swarm["peers"] == 60
            assert {p["peer_id"] for p in swarm["peer_list"]} == joined
            status, scrape = await t.get("/scrape", info_hash=SWARM)
            assert scrape["files"][SWARM] == {"complete": 0, "incomplete": 60, "downloaded": 0}

    run(scenario)


def test_sampling_is_random_over_all_live_peers() -> None:
    async def scenario() -> None:
        async with running() as t:
            for i in range(40):
                await t.announce(f"peer-{i}")
            seen: set[str] = set()
            for _ in range(60):
                answer = await t.announce("peer-0", numwant=5)
                assert len(answer["peers"]) == 5 and len(ids(answer)) == 5
                assert "peer-0" not in ids(answer)
                seen |= ids(answer)
            # 300 draws of 5 from 39: a first-k or stuck sampler could not cover them all.
            assert seen == {f"peer-{i}" for i in range(1, 40)}
            answer = await t.announce("peer-1", numwant=0)
            assert answer["peers"] == []

    run(scenario)


def test_stopped_peers_leave_and_completed_peers_are_counted() -> None:
    async def scenario() -> None:
        async with running() as t:
            for i in range(5):
                await t.announce(f"peer-{i}")
            answer = await t.announce("peer-4", event="stopped")
            assert answer["peers"] == []
            answer = await t.announce("peer-0", event="completed", numwant=50)
            assert ids(answer) == {"peer-1", "peer-2", "peer-3"}
            assert (answer["complete"], answer["incomplete"]) == (1, 3)
            await t.announce("peer-0", event="completed")  # twice counts once
            _status, scrape = await t.get("/scrape")
            assert scrape["files"][SWARM] == {"complete": 1, "incomplete": 3, "downloaded": 1}
            await t.announce("peer-9", event="stopped")  # unknown peer: nothing to do

    run(scenario)


def test_silent_peers_expire_after_two_intervals() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        config = TrackerConfig(port=0, rate_limit=0, max_peers_per_address=0, interval=10)
        async with running(config, clock=clock) as t:
            await t.announce("early")
            await t.announce("steady")
            clock.advance(15)
            await t.announce("steady")
            clock.advance(10)  # early silent 25 s > 20 s; steady silent 10 s
            answer = await t.announce("late", numwant=50)
            assert ids(answer) == {"steady"}
            status, swarm = await t.get(f"/swarms/{SWARM}")
            assert status == 200 and swarm["peers"] == 2
            clock.advance(21)
            status, swarm = await t.get(f"/swarms/{SWARM}")
            assert status == 200 and swarm["peers"] == 0
            _status, health = await t.get("/healthz")
            assert health["peers"] == 0 and health["swarms"] == 1

    run(scenario)


def test_a_restarted_tracker_remembers_its_swarms(tmp_path: Path) -> None:
    db = tmp_path / "tracker.sqlite"
    clock = FakeClock()
    config = TrackerConfig(port=0, rate_limit=0, max_peers_per_address=0, interval=10, db_path=db)

    async def first() -> int:
        async with running(config, clock=clock) as t:
            for i in range(12):
                await t.announce(f"peer-{i}", round=i, accuracy="0.5", bytes_sent=100 * i)
            await t.announce("peer-0", event="completed")
            await t.announce("gone", event="started")
            await t.announce("gone", event="stopped")
            await t.announce("x", info_hash=OTHER)
            _status, swarm = await t.get(f"/swarms/{SWARM}")
            return int(swarm["tracker_bytes_in"])

    async def second(bytes_in: int) -> None:
        async with running(config, clock=clock) as t:
            _status, swarm = await t.get(f"/swarms/{SWARM}")
            assert swarm["peers"] == 12 and swarm["downloaded"] == 1 and swarm["complete"] == 1
            assert swarm["tracker_bytes_in"] >= bytes_in
            assert swarm["max_round"] == 11 and swarm["bytes_sent"] == 100 * sum(range(12))
            clock.advance(15)
            answer = await t.announce("newcomer", numwant=50)
            assert ids(answer) == {f"peer-{i}" for i in range(12)}
            clock.advance(10)  # the old peers' 25 s of silence ends them; the counters stay

    async def third() -> None:
        async with running(config, clock=clock) as t:
            status, swarm = await t.get(f"/swarms/{SWARM}")
            assert swarm["peers"] == 1 and swarm["peer_list"][0]["peer_id"] == "newcomer"
            assert swarm["downloaded"] == 1
            status, _other = await t.get(f"/swarms/{OTHER}")
            assert status == 200

    bytes_in = asyncio.run(first())
    asyncio.run(second(bytes_in))
    clock.advance(1)
    asyncio.run(third())
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_write_behind_reaches_sqlite_without_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "tracker.sqlite"

    async def scenario() -> None:
        config = TrackerConfig(
            port=0, rate_limit=0, max_peers_per_address=0, db_path=db, flush_interval=60
        )
        async with running(config) as t:
            for i in range(7):
                await t.announce(f"peer-{i}")
            await t.announce("peer-6", event="stopped")
            written = await t.server.flush()
            assert written > 0
            with sqlite3.connect(db) as conn:
                rows = conn.execute("SELECT peer_id FROM peers WHERE info_hash = ?", (SWARM,))
                assert {r[0] for r in rows} == {f"peer-{i}" for i in range(6)}
            assert await t.server.flush() == 0  # nothing new

    run(scenario)


BAD_ANNOUNCES = [
    ({"peer_id": "p", "port": 1}, "info_hash"),
    ({"info_hash": "z" * 64, "peer_id": "p", "port": 1}, "info_hash"),
    ({"info_hash": "a" * 63, "peer_id": "p", "port": 1}, "info_hash"),
    ({"info_hash": SWARM, "port": 1}, "peer_id"),
    ({"info_hash": SWARM, "peer_id": "bad id", "port": 1}, "peer_id"),
    ({"info_hash": SWARM, "peer_id": "p" * 65, "port": 1}, "peer_id"),
    ({"info_hash": SWARM, "peer_id": "p<script>", "port": 1}, "peer_id"),
    ({"info_hash": SWARM, "peer_id": "p"}, "port"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 0}, "port"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 70000}, "port"),
    ({"info_hash": SWARM, "peer_id": "p", "port": "+80"}, "port"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "event": "paused"}, "event"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "round": -1}, "round"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "round": 10**12}, "round"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "numwant": "lots"}, "numwant"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "accuracy": "1.5"}, "accuracy"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "accuracy": "nan"}, "accuracy"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "bytes_sent": 2**64}, "bytes_sent"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "bytes_received": "-1"}, "bytes_received"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "pubkey": "ab" * 31}, "pubkey"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "pubkey": "~" * 40}, "pubkey"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "ip": "example.com"}, "ip"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "ip": "224.0.0.1"}, "ip"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "compact": "2"}, "compact"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "format": "xml"}, "format"),
    ({"info_hash": SWARM, "peer_id": "p", "port": 1, "uploaded": "0"}, "uploaded"),
]


def test_every_bad_announce_parameter_gets_400_with_a_reason() -> None:
    async def scenario() -> None:
        async with running() as t:
            for params, name in BAD_ANNOUNCES:
                status, body = await t.get("/announce", **params)
                assert status == 400, (params, body)
                assert name in body["failure reason"], (params, body)
            url = f"{t.server.url}/announce?info_hash={SWARM}&peer_id=p&peer_id=q&port=1"
            async with t.http.get(url) as response:
                assert response.status == 400
                assert "repeated" in (await response.json())["failure reason"]
            status, body = await t.get("/announce", info_hash="x", peer_id="p", port=1, compact=1)
            assert status == 400
            assert b"failure reason" in fastbencode.bdecode(body)
            status, swarms = await t.get("/swarms")
            assert swarms["swarms"] == []  # nothing bad got in

    run(scenario)


def test_oversized_and_odd_requests_are_refused() -> None:
    async def scenario() -> None:
        async with running() as t:
            status, body = await t.get(
                "/announce", info_hash=SWARM, peer_id="p", port=1, x="y" * 3000
            )
            assert status == 414
            async with t.http.get(f"{t.server.url}/healthz", data=b"w" * 5000) as response:
                assert response.status == 413
            async with t.http.post(f"{t.server.url}/announce", data=b"w" * 100_000) as response:
                assert response.status == 413
            async with t.http.get(f"{t.server.url}/swarms/{'c' * 64}") as response:
                assert response.status == 404
            async with t.http.get(f"{t.server.url}/swarms/not-a-hash") as response:
                assert response.status == 400
            async with t.http.get(f"{t.server.url}/nowhere") as response:
                assert response.status == 404
            status, body = await t.get("/scrape", info_hash="nope")
            assert status == 400 and "info_hash" in body["failure reason"]
            status, _body = await t.get("/swarms", verbose=1)
            assert status == 400
            status, health = await t.get("/healthz")
            assert health["status"] == "ok"

    run(scenario)


def test_closed_tracker_admits_only_allowed_and_served_swarms(tmp_path: Path) -> None:
    served = write_session(tmp_path)

    async def scenario() -> None:
        config = TrackerConfig(
            port=0, rate_limit=0, max_peers_per_address=0, allow=frozenset({SWARM})
        )
        async with running(config, torrents=[served.path]) as t:
            await t.announce("p", info_hash=SWARM)
            await t.announce("p", info_hash=served.info_hash)
            status, body = await t.get("/announce", info_hash=OTHER, peer_id="p", port=1)
            assert status == 403 and "closed" in body["failure reason"]
            status, swarms = await t.get("/swarms")
            assert {s["info_hash"] for s in swarms["swarms"]} == {SWARM, served.info_hash}
            named = [s for s in swarms["swarms"] if s["info_hash"] == served.info_hash]
            assert named[0]["name"] == "served-session"

    run(scenario)


def test_rate_limit_is_a_token_bucket_per_address() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        config = TrackerConfig(port=0, rate_limit=2, rate_burst=3)
        async with running(config, clock=clock) as t:
            for i in range(3):
                await t.announce(f"p{i}")
            status, body = await t.get("/announce", info_hash=SWARM, peer_id="p9", port=1)
            assert status == 429 and "rate" in body["failure reason"]
            async with t.http.get(f"{t.server.url}/healthz") as response:
                assert response.status == 429
                assert response.headers["Retry-After"] == "1"
            clock.advance(0.5)  # one token back at 2 per second
            await t.announce("p9")
            status, _ = await t.get("/healthz")
            assert status == 429
            status, _metrics = await t.get("/metrics")
            assert status == 429

    run(scenario)


def test_limiter_forgets_idle_clients() -> None:
    limiter = RateLimiter(10, 5, max_clients=4)
    for i in range(4):
        assert limiter.admit(f"10.0.0.{i}", 0.0) == 0.0
    assert len(limiter) == 4
    limiter.prune(1.0)  # everyone refilled
    assert len(limiter) == 0
    assert RateLimiter(0, 1).admit("x", 0.0) == 0.0


def test_swarm_and_tracker_caps() -> None:
    async def scenario() -> None:
        config = TrackerConfig(
            port=0, rate_limit=0, max_peers_per_address=0, max_peers_per_swarm=3, max_swarms=2
        )
        async with running(config) as t:
            for i in range(3):
                await t.announce(f"p{i}")
            status, body = await t.get("/announce", info_hash=SWARM, peer_id="p3", port=1)
            assert status == 403 and "full" in body["failure reason"]
            await t.announce("p1", round=2)  # members may still re-announce
            await t.announce("q", info_hash=OTHER)
            third = "c" * 64
            status, body = await t.get("/announce", info_hash=third, peer_id="r", port=1)
            assert status == 503
            await t.announce("q", info_hash=OTHER, event="stopped")
            await t.announce("r", info_hash=third)  # the empty swarm made room
            status, swarms = await t.get("/swarms")
            assert {s["info_hash"] for s in swarms["swarms"]} == {SWARM, third}

    run(scenario)


def test_keys_and_address_overrides() -> None:
    async def scenario() -> None:
        async with running() as t:
            await t.announce("hex", pubkey=HEX_KEY.upper())
            await t.announce("z85", pubkey=Z85_KEY, ip="10.1.2.3", port=4000)
            answer = await t.announce("bare", numwant=10)
            peers = {p["peer_id"]: p for p in answer["peers"]}
            assert peers["hex"]["pubkey"] == HEX_KEY
            assert peers["z85"] == {
                "peer_id": "z85",
                "ip": "10.1.2.3",
                "port": 4000,
                "pubkey": Z85_KEY,
            }
            status, body = await t.get(
                "/announce", info_hash=SWARM, peer_id="hex", port=1, pubkey="1" * 64
            )
            assert status == 403 and "signed" in body["failure reason"]  # a bound Ed25519 key
            status, body = await t.get(
                "/announce", info_hash=SWARM, peer_id="z85", port=4000, pubkey="1" * 40
            )
            assert status == 409  # a Z85 key cannot sign: listed, not bound
            answer = await t.get(
                "/announce", info_hash=SWARM, peer_id="bare", port=1, format="bencode"
            )
            decoded = fastbencode.bdecode(answer[1])
            assert decoded[b"interval"] == 30
            by_id = {p[b"peer_id"]: p for p in decoded[b"peers"]}
            assert by_id[b"z85"][b"pubkey"] == Z85_KEY.encode()
            assert b"pubkey" not in by_id.get(b"bare", {b"": b""})

        config = TrackerConfig(port=0, rate_limit=0, max_peers_per_address=0, ip_override="never")
        async with running(config) as t:
            status, body = await t.get(
                "/announce", info_hash=SWARM, peer_id="p", port=1, ip="10.0.0.1"
            )
            assert status == 400 and "ip" in body["failure reason"]

    run(scenario)


def test_pubkey_validation() -> None:
    assert parse_pubkey("AB" * 32) == "ab" * 32
    assert parse_pubkey(Z85_KEY) == Z85_KEY
    with pytest.raises(RequestRejected):
        parse_pubkey("#" * 40)  # every 5-char group overflows 32 bits


def test_a_peer_id_is_bound_to_its_source_address() -> None:
    registry = SwarmRegistry(TrackerConfig(), clock=lambda: 0.0, rng=random.Random(0))
    first = Announce(info_hash=SWARM, peer_id="p", ip="10.0.0.1", port=1, source="10.0.0.1")
    registry.announce(first)
    thief = Announce(
        info_hash=SWARM, peer_id="p", ip="10.0.0.9", port=1, source="10.0.0.9", event="stopped"
    )
    with pytest.raises(RequestRejected) as caught:
        registry.announce(thief)
    assert caught.value.status == 409
    assert len(registry.swarm(SWARM).members) == 1  # type: ignore[union-attr]


def test_tracker_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="allow"):
        TrackerConfig(allow=frozenset({"XYZ"}))
    with pytest.raises(ConfigError, match="numwant"):
        TrackerConfig(numwant=500)
    with pytest.raises(ConfigError, match="header_timeout"):
        TrackerConfig(header_timeout=0)
    with pytest.raises(ConfigError, match="max_peers_per_address"):
        TrackerConfig(max_peers_per_address=-1)
    with pytest.raises(ConfigError, match="history_rounds"):
        TrackerConfig(history_rounds=0)


async def raw_exchange(host: str, port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    return response


def test_metrics_count_exact_http_bytes_in_and_out() -> None:
    async def scenario() -> None:
        async with running() as t:
            await t.announce("warm")
            before = t.server.counters.copy()
            swarm_before = t.server.registry.swarm(SWARM).stats()  # type: ignore[union-attr]
            request = (
                f"GET /announce?info_hash={SWARM}&peer_id=raw&port=9 HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nConnection: close\r\n\r\n"
            ).encode()
            response = await raw_exchange("127.0.0.1", t.server.port or 0, request)
            assert response.startswith(b"HTTP/1.1 200 OK\r\n")
            assert t.server.counters["bytes_in"] - before["bytes_in"] == len(request)
            assert t.server.counters["bytes_out"] - before["bytes_out"] == len(response)
            swarm = t.server.registry.swarm(SWARM).stats()  # type: ignore[union-attr]
            assert swarm["tracker_bytes_in"] - swarm_before["tracker_bytes_in"] == len(request)
            assert swarm["tracker_bytes_out"] - swarm_before["tracker_bytes_out"] == len(response)
            async with t.http.get(f"{t.server.url}/metrics") as reply:
                text = await reply.text()
            assert reply.content_type == "text/plain"
            samples = dict(
                line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")
            )
            assert int(samples["fedtorrent_tracker_announces_total"]) == 2
            assert int(samples["fedtorrent_tracker_peers"]) == 2
            assert int(samples[f'fedtorrent_tracker_swarm_peers{{info_hash="{SWARM}"}}']) == 2
            assert int(samples["fedtorrent_tracker_bytes_received_total"]) >= len(request)
            assert "# TYPE fedtorrent_tracker_bytes_sent_total counter" in text

    run(scenario)


class Served:
    def __init__(self, path: Path, info_hash: str, state: bytes) -> None:
        self.path, self.info_hash, self.state = path, info_hash, state


def write_session(tmp_path: Path) -> Served:
    state = b"not really safetensors, but the tracker only checks the hash" * 10
    session = Session(
        name="served-session",
        model=ModelConfig("logreg"),
        data=DataConfig(),
        train=TrainConfig(),
        mixing=MixingConfig(),
        rounds=3,
        cohort_size=2,
        state_sha256=hashlib.sha256(state).hexdigest(),
        state_size=len(state),
    )
    torrent = Torrent(announce="http://127.0.0.1:1/announce", session=session)
    path = save_torrent(torrent, tmp_path / "served.torrent")
    state_path_for(path).write_bytes(state)
    return Served(path, torrent.info_hash, state)


def test_torrents_and_initial_state_are_served(tmp_path: Path) -> None:
    served = write_session(tmp_path)

    async def scenario() -> None:
        async with running(torrents=[served.path]) as t:
            status, listing = await t.get("/torrents")
            assert listing["torrents"] == [
                {
                    "info_hash": served.info_hash,
                    "name": "served-session",
                    "state_size": len(served.state),
                }
            ]
            status, body = await t.get(f"/torrents/{served.info_hash}")
            assert status == 200 and body == served.path.read_bytes()
            status, body = await t.get(f"/torrents/{served.info_hash}/state")
            assert status == 200 and body == served.state
            status, body = await t.get(f"/torrents/{OTHER}")
            assert status == 404

    run(scenario)
    state_path_for(served.path).write_bytes(b"tampered")

    async def tampered() -> None:
        server = TrackerServer(TrackerConfig(port=0), torrents=[served.path])
        with pytest.raises(Exception, match=r"info\.state\.size"):
            await server.start()
        await server.close()

    run(tampered)


def test_cli_tracker_runs_as_a_process_and_stops_on_sigterm(tmp_path: Path) -> None:
    command = [
        sys.executable, "-c", "from fedtorrent.cli import main; main()", "tracker",
        "--port", "0", "--db", str(tmp_path / "t.sqlite"), "--interval", "5",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("tracker listening on http://127.0.0.1:"), line
        url = line.split()[3]
        client = TrackerClient(url + "/announce", timeout=5, retries=0)
        client.announce(SWARM, "a", port=1000)
        answer = client.announce(SWARM, "b", port=1001)
        assert [p.peer_id for p in answer.peers] == ["a"] and answer.interval == 5
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
    with sqlite3.connect(tmp_path / "t.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM peers").fetchone()[0] == 2


def test_the_http_parser_refuses_huge_lines_and_header_floods() -> None:
    async def scenario() -> None:
        async with running() as t:
            port = t.server.port or 0
            tail = b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            floods = [
                b"GET /announce?" + b"x" * 9000 + tail,
                b"GET /healthz HTTP/1.1\r\nHost: a\r\n"
                + b"".join(b"X-%d: y\r\n" % i for i in range(40))
                + b"\r\n",
                b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * 5000 + b"\r\n\r\n",
            ]
            for request in floods:
                response = await raw_exchange("127.0.0.1", port, request)
                assert response.split(b" ", 2)[1] == b"400", response[:80]
            status, _ = await t.get("/healthz")
            assert status == 200

    run(scenario)


# --- key-bound listings, sybil caps, rate limits, connection hygiene ------------------------------


def sign_params(identity: PeerIdentity, ts: int, **params: Any) -> dict[str, Any]:
    """Announce parameters plus ``ts`` and ``sig`` as a signing client sends them."""
    message = announce_message(
        info_hash=params["info_hash"],
        peer_id=params["peer_id"],
        event=params.get("event", ""),
        ip=params.get("ip", ""),
        port=int(params["port"]),
        pubkey=params.get("pubkey", ""),
        ts=ts,
    )
    return {**params, "ts": ts, "sig": identity.sign(message).hex()}


@asynccontextmanager
async def http_from(source: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session whose sockets are bound to ``source`` (any 127/8 address is loopback)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as http:
        yield http


async def get_from(http: aiohttp.ClientSession, url: str, **params: Any) -> tuple[int, Any]:
    async with http.get(url, params={k: str(v) for k, v in params.items()}) as response:
        return response.status, await response.json()


def listing(t: Tracker, peer_id: str) -> dict[str, Any] | None:
    swarm = t.server.registry.swarm(SWARM)
    peer = swarm.by_age.get(peer_id) if swarm is not None else None
    return None if peer is None else {"ip": peer.ip, "port": peer.port, "pubkey": peer.pubkey}


def test_a_key_bound_peer_id_changes_its_listing_only_with_a_fresh_signature() -> None:
    honest, thief = PeerIdentity.generate(), PeerIdentity.generate()
    key = honest.public_key_hex
    base = {"info_hash": SWARM, "peer_id": "peer-1"}

    async def scenario() -> None:
        clock = FakeClock()
        ts = int(clock.now * 1e6)
        async with running(clock=clock) as t:
            await t.announce("peer-1", port=7001, pubkey=key, event="started")
            before = listing(t, "peer-1")
            assert before == {"ip": "127.0.0.1", "port": 7001, "pubkey": key}
            await t.announce("peer-1", port=7001, round=3)  # changes nothing: needs no signature

            refused = [
                ({**base, "port": 7001, "event": "stopped"}, "unsigned"),
                ({**base, "port": 9999}, "unsigned"),
                ({**base, "port": 7001, "ip": "10.9.9.9"}, "unsigned"),
                ({**base, "port": 7001, "pubkey": thief.public_key_hex}, "unsigned"),
                (sign_params(thief, ts + 1, **base, port=9999), "bad_signature"),
                (sign_params(honest, ts - 301 * 10**6, **base, port=9999), "stale"),
            ]
            for params, kind in refused:
                count = t.server.refused[kind]
                status, body = await t.get("/announce", **params)
                assert status == 403, (params, body)
                assert t.server.refused[kind] == count + 1, (params, body)
                assert listing(t, "peer-1") == before, params  # the listing is intact
            assert t.server.refused == {"unsigned": 4, "bad_signature": 1, "stale": 1}

            moved = sign_params(honest, ts + 10, **base, port=7002)
            status, _ = await t.get("/announce", **moved)
            assert status == 200 and listing(t, "peer-1") == {**before, "port": 7002}
            status, _ = await t.get("/announce", **moved)  # changes nothing now: a re-announce
            assert status == 200
            onward = sign_params(honest, ts + 12, **base, port=7003)
            status, _ = await t.get("/announce", **onward)
            assert status == 200 and listing(t, "peer-1") == {**before, "port": 7003}
            status, body = await t.get("/announce", **moved)  # replayed to move it back
            assert status == 403 and "replay" in body["failure reason"]
            assert listing(t, "peer-1") == {**before, "port": 7003}

            async with http_from("127.0.0.2") as other:  # a signed move to another address
                url = t.server.url + "/announce"
                status, _ = await get_from(other, url, **base, port=7003)
                assert status == 403  # unsigned, from the new address
                params = sign_params(honest, ts + 20, **base, port=7003)
                status, _ = await get_from(other, url, **params)
                assert status == 200
                assert listing(t, "peer-1") == {**before, "ip": "127.0.0.2", "port": 7003}
                stop = sign_params(honest, ts + 30, **base, port=7003, event="stopped")
                status, _ = await get_from(other, url, **stop)
                assert status == 200 and listing(t, "peer-1") is None

            # Gone, but still bound: nobody else may list it, its owner may.
            status, _ = await t.get("/announce", **base, port=6666, pubkey=thief.public_key_hex)
            assert status == 403 and listing(t, "peer-1") is None
            again = sign_params(honest, ts + 40, **base, port=7001, pubkey=key, event="started")
            status, _ = await t.get("/announce", **again)
            assert status == 200 and listing(t, "peer-1") == before
            rotated = sign_params(honest, ts + 50, **base, port=7001, pubkey=thief.public_key_hex)
            status, _ = await t.get("/announce", **rotated)  # the old key signs the new one in
            assert status == 200 and listing(t, "peer-1") == {**before, "pubkey": rotated["pubkey"]}
            status, text = await t.get("/metrics")
            assert 'fedtorrent_tracker_refused_total{reason="replay"} 1' in text.decode()

            # Ids that never announced a key keep the old rules.
            await t.announce("bare", port=5000)
            await t.announce("bare", port=5001)
            await t.announce("bare", port=5001, event="stopped")
            assert listing(t, "bare") is None
            status, _ = await t.get("/announce", **base, port=7001, sig="ab" * 64)
            assert status == 400  # sig without ts

    run(scenario)


def test_key_bindings_and_their_last_signature_survive_a_restart(tmp_path: Path) -> None:
    honest = PeerIdentity.generate()
    key = honest.public_key_hex
    clock = FakeClock()
    ts = int(clock.now * 1e6)
    config = TrackerConfig(port=0, rate_limit=0, db_path=tmp_path / "t.sqlite", interval=10)
    moved = sign_params(honest, ts + 1, info_hash=SWARM, peer_id="p", port=2)

    async def first() -> None:
        async with running(config, clock=clock) as t:
            await t.announce("p", port=1, pubkey=key)
            status, _ = await t.get("/announce", **moved)
            assert status == 200
            onward = sign_params(honest, ts + 2, info_hash=SWARM, peer_id="p", port=3)
            status, _ = await t.get("/announce", **onward)
            assert status == 200

    async def second() -> None:
        async with running(config, clock=clock) as t:
            assert listing(t, "p") == {"ip": "127.0.0.1", "port": 3, "pubkey": key}
            status, _ = await t.get(
                "/announce", info_hash=SWARM, peer_id="p", port=3, event="stopped"
            )
            assert status == 403
            status, body = await t.get("/announce", **moved)  # replayed after the restart
            assert status == 403 and "replay" in body["failure reason"]
            clock.advance(25)  # the listing expires; the binding stays
            assert listing(t, "p") is None
            status, _ = await t.get("/announce", info_hash=SWARM, peer_id="p", port=3)
            assert status == 403  # listing it again is a change

    asyncio.run(first())
    asyncio.run(second())
    with sqlite3.connect(tmp_path / "t.sqlite") as conn:
        assert conn.execute("SELECT pubkey, last_ts FROM keys").fetchall() == [(key, ts + 2)]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2


def test_sybils_from_15_addresses_list_at_most_the_cap_each() -> None:
    sources = [f"127.0.0.{i}" for i in range(2, 17)]

    async def flood(url: str, source: str, first: int) -> list[int]:
        statuses = []
        async with http_from(source) as http:
            for i in range(first, first + 100):
                status, _ = await get_from(http, url, info_hash=SWARM, peer_id=f"s{i}", port=1)
                statuses.append(status)
        return statuses

    async def scenario() -> None:
        config = TrackerConfig(port=0)  # the defaults: cap 8 ids per address
        async with running(config) as t:
            cap = config.max_peers_per_address
            url = t.server.url + "/announce"
            results = await asyncio.gather(*(flood(url, s, 100 * n) for n, s in enumerate(sources)))
            statuses = [status for batch in results for status in batch]
            assert len(statuses) == 1500
            swarm = t.server.registry.swarm(SWARM)
            assert swarm is not None and len(swarm.members) <= cap * len(sources)
            assert statuses.count(200) == len(swarm.members)
            assert t.server.refused["address_cap"] == statuses.count(403) >= 1500 - 15 * cap - 15
            assert swarm.per_source == {s: cap for s in sources}
            answer = await t.announce("honest", port=4242)  # another address is not affected
            assert answer["incomplete"] == len(swarm.members)

    run(scenario)


def test_a_flood_from_one_address_gets_429_with_retry_after_others_do_not() -> None:
    async def scenario() -> None:
        config = TrackerConfig(port=0)  # default rate limit
        async with running(config) as t:
            url = t.server.url + "/announce"
            statuses, retry_after = [], set()
            async with http_from("127.0.0.3") as http:
                started = time.monotonic()
                for i in range(300):
                    params = {"info_hash": SWARM, "peer_id": f"f{i % 5}", "port": "1"}
                    async with http.get(url, params=params) as response:
                        statuses.append(response.status)
                        if response.status == 429:
                            retry_after.add(response.headers["Retry-After"])
                elapsed = time.monotonic() - started
            admitted = config.rate_burst + config.rate_limit * elapsed + 1
            assert statuses.count(429) >= 300 - admitted, (elapsed, statuses.count(429))
            assert set(statuses) == {200, 429} and retry_after == {"1"}
            answer = await t.announce("honest", port=4242)  # 127.0.0.1 has its own bucket
            assert answer["interval"] == config.interval

    run(scenario)


def test_a_signing_client_honours_retry_after_from_the_default_limit() -> None:
    identity = PeerIdentity.generate()
    config = TrackerConfig(port=0, rate_burst=2)
    with BackgroundTracker(config) as tracker:
        delays: list[float] = []

        def sleep(seconds: float) -> None:
            delays.append(seconds)
            time.sleep(seconds)

        client = TrackerClient(tracker.url, retries=2, sleep=sleep, identity=identity)
        for port in (1, 2, 3):  # the third announce finds the bucket empty
            client.announce(SWARM, "p", port=port, pubkey=identity.public_key_hex)
        assert delays == [1.0]  # Retry-After, not the 0.5 s backoff
        assert tracker.call(lambda s: s.registry.swarm(SWARM).by_age["p"].port) == 3


async def slowloris(host: str, port: int, source: str, *, limit: float) -> float:
    """Send a request head at one byte a second until the tracker hangs up; seconds it took."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    started = time.monotonic()
    try:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n":
            writer.write(bytes([byte]))
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                    break
            if time.monotonic() - started > limit:
                break
    except OSError:
        pass  # reset by the tracker
    finally:
        writer.close()
    return time.monotonic() - started


async def idler(host: str, port: int, source: str, *, limit: float) -> float:
    """Connect and send nothing; seconds until the tracker hangs up (or ``limit``)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    started = time.monotonic()
    with contextlib.suppress(TimeoutError, OSError):
        await asyncio.wait_for(reader.read(), limit)
    writer.close()
    return time.monotonic() - started


@pytest.mark.slow
def test_slow_and_idle_connections_are_cut_and_counted_while_announces_stay_fast() -> None:
    async def scenario() -> None:
        config = TrackerConfig(
            port=0, rate_limit=0, max_peers_per_address=0, header_timeout=2.0, idle_timeout=3.0
        )
        async with running(config) as t:
            port = t.server.port or 0
            sources = [f"127.0.0.{2 + i % 10}" for i in range(150)]  # 15 per address, cap 32
            await t.announce("warm", port=1)
            quiet = []
            for i in range(20):
                began = time.monotonic()
                await t.announce("honest", port=4242, round=i)
                quiet.append(time.monotonic() - began)
            attack = [
                asyncio.create_task(
                    slowloris("127.0.0.1", port, s, limit=10.0)
                    if n < 100
                    else idler("127.0.0.1", port, s, limit=10.0)
                )
                for n, s in enumerate(sources)
            ]
            while t.server.guard.open < 150:
                await asyncio.sleep(0.05)  # polls the tracker's own count (bounded by the timeout)
            loaded = []
            for i in range(20):
                began = time.monotonic()
                await t.announce("honest", port=4242, round=100 + i)
                loaded.append(time.monotonic() - began)
            durations = await asyncio.gather(*attack)
            slow, idle = durations[:100], durations[100:]
            tick = t.server.guard.tick
            assert max(slow) < config.header_timeout + tick + 1.0, max(slow)
            assert max(idle) < config.idle_timeout + tick + 1.0, max(idle)
            assert min(idle) > config.idle_timeout - 0.1
            counts = t.server.guard.counts
            assert counts["header_timeout"] == 100
            assert counts["idle_timeout"] >= 50  # the test's own keep-alive session may idle too
            assert sorted(loaded)[10] < max(0.05, 5 * sorted(quiet)[10]), (quiet, loaded)
            assert max(loaded) < 1.0, loaded
            _status, health = await t.get("/healthz")
            assert health["connections"]["cut_header_timeout"] == 100
            assert health["connections"]["cut_idle_timeout"] >= 50
            _status, text = await t.get("/metrics")
            assert (
                'fedtorrent_tracker_connections_closed_total{reason="header_timeout"} 100'
                in text.decode()
            )

    run(scenario)


def test_each_address_may_hold_only_so_many_connections() -> None:
    async def scenario() -> None:
        config = TrackerConfig(port=0, rate_limit=0, max_connections_per_address=4)
        async with running(config) as t:
            port = t.server.port or 0
            held = [
                await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.5", 0))
                for _ in range(4)
            ]
            while t.server.guard.per_address.get("127.0.0.5", 0) < 4:
                await asyncio.sleep(0.01)
            request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=("127.0.0.5", 0)
            )
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in answer
            assert t.server.guard.counts["address_cap"] == 1
            status, _ = await t.get("/healthz")  # 127.0.0.1 is another address
            assert status == 200
            held[0][1].close()
            while t.server.guard.per_address.get("127.0.0.5", 0) > 3:
                await asyncio.sleep(0.01)
            response = await raw_exchange_from("127.0.0.5", port, request)
            assert response.startswith(b"HTTP/1.1 200 OK")
            for _, other in held[1:]:
                other.close()

    run(scenario)


async def raw_exchange_from(source: str, port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(request)
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return response


def test_history_keeps_bounded_rounds_per_peer_and_bounded_peers() -> None:
    config = TrackerConfig(history_rounds=3, history_peers=2)
    clock = FakeClock()
    registry = SwarmRegistry(config, clock=clock, rng=random.Random(0))

    def announce(peer_id: str, round_: int, accuracy: float | None = None) -> None:
        registry.announce(
            Announce(
                info_hash=SWARM, peer_id=peer_id, ip="10.0.0.1", port=1, source="10.0.0.1",
                round=round_, accuracy=accuracy, bytes_sent=10 * round_,
            )
        )  # fmt: skip

    for r in range(5):
        announce("a", r, 0.1 * r)
    assert [p[0] for p in registry.history(SWARM)["a"]] == [2, 3, 4]
    announce("a", 4, 0.9)  # the same round again replaces it
    announce("a", 3)  # a restart from an earlier round drops what came after
    assert registry.history(SWARM)["a"] == [(2, 0.2, 20, 0), (3, None, 30, 0)]
    announce("b", 1)
    announce("c", 1)  # two series at most, and both are live: c is not kept
    assert set(registry.history(SWARM)) == {"a", "b"}
    clock.advance(registry.ttl / 2)
    announce("b", 2)
    clock.advance(registry.ttl / 2 + 1)  # a has been silent for longer than a ttl, b has not
    announce("c", 1)
    assert set(registry.history(SWARM)) == {"b", "c"}
    assert registry.history(OTHER) == {}
