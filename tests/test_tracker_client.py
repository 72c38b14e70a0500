"""TrackerClient against a real tracker thread: answers, refusals, retries, the offline cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtorrent.config import DataConfig, MixingConfig, ModelConfig, TrackerConfig, TrainConfig
from fedtorrent.errors import TrackerError
from fedtorrent.net.identity import PeerIdentity
from fedtorrent.net.torrent import Session, Torrent, load_torrent, save_torrent, state_path_for
from fedtorrent.net.tracker.client import (
    TrackerClient,
    TrackerRefusedError,
    download_session,
    download_torrent,
    parse_answer,
)
from fedtorrent.net.tracker.server import BackgroundTracker

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]

SWARM = "c" * 64


class FakeClock:
    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        return self.now


class RecordingSleep:
    """Stands in for time.sleep: records each delay and may run an action (e.g. move a clock)."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.delays: list[float] = []
        self.clock = clock

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.clock is not None:
            self.clock.now += seconds


@pytest.fixture
def tracker() -> Iterator[BackgroundTracker]:
    with BackgroundTracker(TrackerConfig(port=0, rate_limit=0), rng=random.Random(3)) as running:
        yield running


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_announce_returns_typed_peers_and_never_the_asker(tracker: BackgroundTracker) -> None:
    client = TrackerClient(f"{tracker.url}/announce", timeout=5, retries=0)
    key = "12" * 32
    for i in range(6):
        client.announce(SWARM, f"peer-{i}", port=9000 + i, event="started", pubkey=key)
    answer = client.announce(SWARM, "peer-0", port=9000, round=3, accuracy=0.875, numwant=3)
    assert answer.interval == 30 and not answer.cached
    assert len(answer.peers) == 3 and "peer-0" not in {p.peer_id for p in answer.peers}
    for peer in answer.peers:
        assert peer.ip == "127.0.0.1" and peer.port == 9000 + int(peer.peer_id[-1])
        assert peer.pubkey == key
    stats = client.swarm(SWARM)
    mine = next(p for p in stats["peer_list"] if p["peer_id"] == "peer-0")
    assert (mine["round"], mine["accuracy"]) == (3, 0.875)
    assert client.scrape([SWARM])[SWARM]["incomplete"] == 6
    assert TrackerClient(tracker.url).healthz()["peers"] == 6  # base URL works as well
    assert tracker.call(lambda server: server.registry.peer_count) == 6


def test_a_refusal_is_raised_at_once_without_retries(tracker: BackgroundTracker) -> None:
    sleep = RecordingSleep()
    client = TrackerClient(tracker.url, retries=3, backoff=0.01, sleep=sleep)
    with pytest.raises(TrackerRefusedError) as caught:
        client.announce(SWARM, "bad id", port=1)
    assert caught.value.status == 400 and "peer_id" in caught.value.reason
    assert sleep.delays == []


def test_rate_limited_announces_wait_as_told_and_retry() -> None:
    clock = FakeClock()
    config = TrackerConfig(port=0, rate_limit=1, rate_burst=1)
    with BackgroundTracker(config, clock=clock) as running:
        sleep = RecordingSleep(clock)  # sleeping moves the tracker's clock: no real waiting
        client = TrackerClient(running.url, retries=2, backoff=0.01, sleep=sleep)
        client.announce(SWARM, "a", port=1)
        answer = client.announce(SWARM, "a", port=1)
        assert sleep.delays == [1.0]  # the Retry-After the tracker sent
        assert not answer.cached


def test_peers_keep_their_last_list_while_the_tracker_is_down() -> None:
    running = BackgroundTracker(TrackerConfig(port=0, rate_limit=0))
    running.start()
    sleep = RecordingSleep()
    client = TrackerClient(running.url, timeout=2, retries=2, backoff=0.05, sleep=sleep)
    try:
        client.announce(SWARM, "other", port=2)
        fresh = client.announce(SWARM, "me", port=1)
        assert [p.peer_id for p in fresh.peers] == ["other"]
    finally:
        running.close()
    assert sleep.delays == []
    answer = client.announce(SWARM, "me", port=1, round=4)
    assert answer.cached and answer.peers == fresh.peers
    assert 0.025 <= sleep.delays[0] <= 0.05 and 0.05 <= sleep.delays[1] <= 0.1
    assert len(sleep.delays) == 2  # retries, then the cache
    with pytest.raises(TrackerError, match="unreachable"):
        client.announce("d" * 64, "me", port=1)  # nothing cached for this swarm
    with pytest.raises(TrackerError):
        client.announce(SWARM, "me", port=1, event="stopped")
    assert client.last_answer(SWARM) == fresh


def test_backoff_doubles_and_is_capped() -> None:
    sleep = RecordingSleep()
    client = TrackerClient(
        f"http://127.0.0.1:{free_port()}",
        timeout=1,
        retries=5,
        backoff=1.0,
        max_backoff=4.0,
        sleep=sleep,
        rng=random.Random(0),
    )
    with pytest.raises(TrackerError):
        client.healthz()
    assert len(sleep.delays) == 5
    for attempt, delay in enumerate(sleep.delays):
        assert min(4.0, 0.5 * 2**attempt) <= delay <= min(4.0, 2**attempt)


def test_a_silent_tracker_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts connections, never answers
        port = listener.getsockname()[1]
        client = TrackerClient(f"http://127.0.0.1:{port}", timeout=0.3, retries=0)
        with pytest.raises(TrackerError, match="unreachable"):
            client.announce(SWARM, "me", port=1)


@pytest.mark.parametrize(
    "document",
    [
        {"interval": 30, "complete": 0, "incomplete": 1},
        {"interval": 0, "complete": 0, "incomplete": 1, "peers": []},
        {"interval": 30, "complete": 0, "incomplete": 1, "peers": [{"peer_id": "p"}]},
        {"interval": 30, "complete": 0, "incomplete": 1, "peers": [
            {"peer_id": "p", "ip": "evil.example", "port": 1, "pubkey": None}]},
        {"interval": 30, "complete": 0, "incomplete": 1, "peers": [
            {"peer_id": "p", "ip": "1.2.3.4", "port": 0, "pubkey": None}]},
        {"interval": 30, "complete": 0, "incomplete": 1, "peers": [
            {"peer_id": "p q", "ip": "1.2.3.4", "port": 1, "pubkey": None}]},
        {"interval": 30, "complete": 0, "incomplete": 1, "peers": [
            {"peer_id": "p", "ip": "1.2.3.4", "port": 1, "pubkey": "short"}]},
        [],
    ],
)  # fmt: skip
def test_malformed_answers_are_rejected(document: object) -> None:
    with pytest.raises(TrackerError):
        parse_answer(json.dumps(document).encode())


def test_joining_a_session_from_the_tracker(tmp_path: Path) -> None:
    from fedtorrent.models import build_model
    from fedtorrent.state import encode_state

    state = encode_state(build_model("logreg", input_shape=(1, 8, 8), num_classes=10).state_dict())
    session = Session(
        name="joinable",
        model=ModelConfig("logreg"),
        data=DataConfig(dataset="digits"),
        train=TrainConfig(),
        mixing=MixingConfig(),
        rounds=2,
        cohort_size=1,
        state_sha256=hashlib.sha256(state).hexdigest(),
        state_size=len(state),
    )
    torrent = Torrent(announce="http://127.0.0.1:1/announce", session=session)
    path = save_torrent(torrent, tmp_path / "join.torrent")
    state_path_for(path).write_bytes(state)
    with BackgroundTracker(TrackerConfig(port=0), torrents=[path]) as running:
        client = TrackerClient(running.url, retries=0)
        fetched = client.fetch_torrent(torrent.info_hash)
        assert fetched == torrent
        assert client.fetch_state(fetched) == state
        assert download_torrent(f"{running.url}/torrents/{torrent.info_hash}") == torrent
        joined = download_session(f"{running.url}/torrents/{torrent.info_hash}", tmp_path / "j")
        assert load_torrent(joined) == torrent
        assert state_path_for(joined).read_bytes() == state
        with pytest.raises(TrackerRefusedError):
            download_session(f"{running.url}/torrents/{'e' * 64}", tmp_path / "nothing")
        assert not (tmp_path / "nothing").exists()
        with pytest.raises(TrackerRefusedError):
            client.fetch_torrent("e" * 64)
        other = Torrent(
            announce=torrent.announce,
            session=dataclasses.replace(session, state_sha256="0" * 64),
        )
        with pytest.raises(TrackerRefusedError):
            client.fetch_state(other)  # not served under that info-hash


def test_a_signing_client_stops_and_moves_its_peer_and_nobody_else_can(
    tracker: BackgroundTracker,
) -> None:
    identity = PeerIdentity.generate()
    key = identity.public_key_hex
    mine = TrackerClient(tracker.url, retries=0, identity=identity)
    other = TrackerClient(tracker.url, retries=0)  # same address, no key: an impostor

    def listed() -> tuple[int, str | None] | None:
        peer = tracker.call(lambda s: s.registry.swarm(SWARM).by_age.get("peer-1"))
        return None if peer is None else (peer.port, peer.pubkey)

    mine.announce(SWARM, "peer-1", port=7001, event="started", pubkey=key.upper())
    assert listed() == (7001, key)
    for change in ({"port": 7999}, {"port": 7001, "event": "stopped"}):
        with pytest.raises(TrackerRefusedError) as caught:
            other.announce(SWARM, "peer-1", **change)  # type: ignore[arg-type]
        assert caught.value.status == 403 and "signed" in caught.value.reason
        assert listed() == (7001, key)
    mine.announce(SWARM, "peer-1", port=7002, round=1)
    assert listed() == (7002, key)
    mine.announce(SWARM, "peer-1", port=7002, event="stopped")
    assert listed() is None
    mine.announce(SWARM, "peer-1", port=7003, event="started", pubkey=key)
    assert listed() == (7003, key)
