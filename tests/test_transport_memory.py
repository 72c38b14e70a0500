"""The in-memory transport keeps the transport contract: lifecycle, fetch, deadlines, accounting."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import torch

from fedtorrent.errors import ConfigError, MessageError, NetworkError
from fedtorrent.net import wire
from fedtorrent.net.transport import (
    Endpoint,
    FetchTimeoutError,
    MemoryNetwork,
    MemoryTransport,
    PeerRefusedError,
    ServedEvent,
    TrafficStats,
    TransportConfig,
)
from fedtorrent.net.transport import base as transport_base
from fedtorrent.net.transport.base import MAX_LOGGED_REQUESTERS, RateLimiter
from fedtorrent.state import encode_state

INFO_HASH = "ab" * 32

pytestmark = pytest.mark.timeout(30)


def model_state(fill: float = 0.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 2), fill), "b": torch.arange(2, dtype=torch.float32) + fill}


def state_frames(peer_id: str, round: int, fill: float = 1.0) -> list[bytes]:
    return wire.encode_message(
        encode_state(model_state(fill)),
        info_hash=INFO_HASH,
        sender=peer_id,
        round=round,
        num_examples=10,
    )


@pytest.fixture
def network() -> MemoryNetwork:
    return MemoryNetwork()


@pytest.fixture
def peers(network: MemoryNetwork) -> Iterator[list[MemoryTransport]]:
    transports = [
        MemoryTransport(network, TransportConfig(info_hash=INFO_HASH, peer_id=f"p{i}"))
        for i in range(4)
    ]
    for t in transports:
        t.start()
    yield transports
    for t in transports:
        t.close()


def endpoint(t: MemoryTransport) -> Endpoint:
    return Endpoint(peer_id=t.config.peer_id, address=t.address)


def test_constructor_starts_nothing(network: MemoryNetwork) -> None:
    transport = MemoryTransport(network, TransportConfig(info_hash=INFO_HASH, peer_id="p"))
    with pytest.raises(NetworkError):
        _ = transport.address
    with pytest.raises(NetworkError):
        transport.fetch(Endpoint("q", "mem://0"), round=0, timeout=0.1)


def test_lifecycle_is_explicit_and_close_is_idempotent(network: MemoryNetwork) -> None:
    config = TransportConfig(info_hash=INFO_HASH, peer_id="p")
    with MemoryTransport(network, config) as transport:
        assert transport.address.startswith("mem://")
        with pytest.raises(NetworkError):
            transport.start()
    transport.close()
    with pytest.raises(NetworkError):
        transport.start()
    with pytest.raises(NetworkError):
        transport.fetch(Endpoint("q", "mem://0"), round=0, timeout=0.1)


def test_fetch_returns_the_published_state(peers: list[MemoryTransport]) -> None:
    server, client = peers[0], peers[1]
    server.publish(state_frames("p0", round=5, fill=2.0))
    reply = client.fetch(endpoint(server), round=4, timeout=1.0, like_state=model_state())
    assert reply.header.round == 5 and reply.header.num_examples == 10
    assert reply.state is not None
    assert torch.equal(reply.state["w"], model_state(2.0)["w"])
    assert reply.rtt_s >= 0
    # Publishing again replaces what is served, except for a requester still in round 5: it
    # gets the state of its own round, as the simulator's lockstep rounds would give it.
    server.publish(state_frames("p0", round=6, fill=3.0))
    again = client.fetch(endpoint(server), round=6, timeout=1.0, like_state=model_state())
    assert again.header.round == 6 and again.state is not None
    assert torch.equal(again.state["b"], model_state(3.0)["b"])
    behind = client.fetch(endpoint(server), round=5, timeout=1.0, like_state=model_state())
    assert behind.header.round == 5 and behind.state is not None
    assert torch.equal(behind.state["b"], model_state(2.0)["b"])
    early = client.fetch(endpoint(server), round=3, timeout=1.0, like_state=model_state())
    assert early.header.round == 6  # not the previous round's: the latest


def test_a_requester_holding_a_base_gets_that_variant_undecoded(
    peers: list[MemoryTransport],
) -> None:
    server, client = peers[0], peers[1]
    update = wire.encode_message(
        b"updates", info_hash=INFO_HASH, sender="p0", round=5, num_examples=10,
        codec="int8", base=4,
    )  # fmt: skip
    server.publish(state_frames("p0", round=5, fill=2.0), variants={4: update})
    target = endpoint(server)
    full = client.fetch(target, round=5, timeout=1.0, like_state=model_state())
    assert full.header.codec is None and full.state is not None
    holding = Endpoint(target.peer_id, target.address, base=4)
    delta = client.fetch(holding, round=5, timeout=1.0, like_state=model_state())
    assert (delta.header.codec, delta.header.base) == ("int8", 4)
    assert delta.state is None and bytes(delta.payload) == b"updates"  # the caller decodes it
    other = Endpoint(target.peer_id, target.address, base=2)  # a base it has no updates from
    assert client.fetch(other, round=5, timeout=1.0).header.codec is None
    with pytest.raises(ConfigError, match="variant"):
        server.publish(state_frames("p0", round=6), variants={4: update})  # round 5's, not 6's


def test_a_requester_holding_the_served_state_is_told_not_ready_not_sent_it_again(
    peers: list[MemoryTransport],
) -> None:
    server, client = peers[0], peers[1]
    server.publish(state_frames("p0", round=3))
    target = endpoint(server)
    assert client.fetch(target, round=4, timeout=1.0).header.round == 3  # stale, whole
    holding = Endpoint(target.peer_id, target.address, base=3)
    with pytest.raises(PeerRefusedError, match="not_ready"):
        client.fetch(holding, round=4, timeout=1.0)
    server.publish(state_frames("p0", round=4))
    assert client.fetch(holding, round=4, timeout=1.0).header.round == 4  # news: sent


def test_fetch_without_like_state_verifies_but_does_not_decode(
    peers: list[MemoryTransport],
) -> None:
    peers[0].publish(state_frames("p0", round=1))
    reply = peers[1].fetch(endpoint(peers[0]), round=1, timeout=1.0)
    assert reply.state is None
    assert bytes(reply.payload) == state_frames("p0", round=1)[1]


def test_publish_refuses_frames_of_another_peer_or_session(
    peers: list[MemoryTransport],
) -> None:
    with pytest.raises(ConfigError):
        peers[0].publish(state_frames("p1", round=1))
    other = wire.encode_message(
        encode_state(model_state()), info_hash="cd" * 32, sender="p0", round=1, num_examples=1
    )
    with pytest.raises(ConfigError):
        peers[0].publish(other)
    with pytest.raises(ConfigError):
        peers[0].publish(state_frames("p0", round=1)[:1])


def test_a_transport_that_serves_no_older_rounds_refuses_until_the_round_is_published(
    network: MemoryNetwork, peers: list[MemoryTransport]
) -> None:
    config = TransportConfig(info_hash=INFO_HASH, peer_id="central", serve_older=False)
    with MemoryTransport(network, config) as server:
        server.publish(state_frames("central", round=1))
        client, at = peers[1], Endpoint("central", server.address)
        assert client.fetch(at, round=1, timeout=1.0).header.round == 1
        with pytest.raises(PeerRefusedError, match="not_ready"):
            client.fetch(at, round=2, timeout=1.0)  # round 1 is of no use to round 2
        server.publish(state_frames("central", round=2))
        assert client.fetch(at, round=2, timeout=1.0).header.round == 2
        assert client.fetch(at, round=1, timeout=1.0).header.round == 1  # one behind: its own
        traffic = server.stats.snapshot()["totals"]
        payload = len(state_frames("central", round=1)[1])
        assert traffic["payload_sent"] == 3 * payload  # the refusal moved a header only
        assert traffic["messages_sent"] == 4


def test_a_leaving_peer_answers_gone_instead_of_its_state(peers: list[MemoryTransport]) -> None:
    server, client = peers[0], peers[1]
    server.publish(state_frames("p0", round=3))
    assert client.fetch(endpoint(server), round=3, timeout=1.0).header.round == 3
    server.leave()
    with pytest.raises(PeerRefusedError, match="gone") as caught:
        client.fetch(endpoint(server), round=4, timeout=1.0)
    assert caught.value.kind == "refused:gone"
    assert server.stats.snapshot()["totals"]["payload_sent"] == len(state_frames("p0", 3)[1])


def test_not_ready_peer_refuses(peers: list[MemoryTransport]) -> None:
    with pytest.raises(PeerRefusedError, match="not_ready"):
        peers[1].fetch(endpoint(peers[0]), round=0, timeout=1.0)
    assert peers[1].stats.snapshot()["failures"] == {"p0": {"refused:not_ready": 1}}


def test_peer_of_another_session_is_rejected(network: MemoryNetwork) -> None:
    stranger = MemoryTransport(network, TransportConfig(info_hash="cd" * 32, peer_id="s"))
    with stranger, MemoryTransport(network, TransportConfig(INFO_HASH, "p")) as client:
        with pytest.raises(MessageError) as info:
            client.fetch(Endpoint("s", stranger.address), round=0, timeout=1.0)
        assert info.value.reason == "wrong_session"
        assert client.stats.rejections() == {"wrong_session": 1}
        # The stranger refused our request for the same reason and counted it.
        assert stranger.stats.rejections() == {"wrong_session": 1}


def test_reply_from_another_peer_id_is_rejected(peers: list[MemoryTransport]) -> None:
    peers[0].publish(state_frames("p0", round=1))
    with pytest.raises(MessageError) as info:
        peers[1].fetch(Endpoint("p9", peers[0].address), round=1, timeout=1.0)
    assert info.value.reason == "wrong_sender"


def test_unknown_address_times_out_after_the_timeout(peers: list[MemoryTransport]) -> None:
    start = time.monotonic()
    with pytest.raises(FetchTimeoutError):
        peers[0].fetch(Endpoint("ghost", "mem://999"), round=0, timeout=0.2)
    assert 0.15 <= time.monotonic() - start < 1.0
    assert peers[0].stats.snapshot()["failures"] == {"ghost": {"timeout": 1}}


def test_fetch_many_returns_what_arrived_before_the_deadline(
    network: MemoryNetwork, peers: list[MemoryTransport]
) -> None:
    for t in peers[1:]:
        t.publish(state_frames(t.config.peer_id, round=2))
    network.silence(peers[3].address)  # alive but silent, like a SIGKILLed peer
    start = time.monotonic()
    result = peers[0].fetch_many(
        [endpoint(t) for t in peers[1:]], round=2, timeout=0.3, like_state=model_state()
    )
    elapsed = time.monotonic() - start
    assert set(result.replies) == {"p1", "p2"}
    assert set(result.failures) == {"p3"}
    assert isinstance(result.failures["p3"], NetworkError)
    assert elapsed < 1.0


def test_fetch_many_rejects_duplicate_peers(peers: list[MemoryTransport]) -> None:
    with pytest.raises(ConfigError):
        peers[0].fetch_many([endpoint(peers[1]), endpoint(peers[1])], round=0, timeout=0.1)


def test_close_aborts_a_fetch_in_flight(network: MemoryNetwork) -> None:
    client = MemoryTransport(network, TransportConfig(INFO_HASH, "c"))
    client.start()
    errors: list[BaseException] = []
    started = threading.Event()

    def fetch() -> None:
        started.set()
        try:
            client.fetch(Endpoint("ghost", "mem://999"), round=0, timeout=30.0)
        except NetworkError as exc:
            errors.append(exc)

    thread = threading.Thread(target=fetch)
    thread.start()
    started.wait(5)
    begin = time.monotonic()
    client.close()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - begin < 2.0
    assert len(errors) == 1


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ([b"\xc1"], "bad_header"),
        ([b"a", b"b", b"c"], "bad_frames"),
        ("tamper", "bad_digest"),
        ("nan", "non_finite"),
        ("shape", "bad_shape"),
        ("header_only", "bad_frames"),
    ],
)
def test_bad_replies_are_rejected_and_counted(
    network: MemoryNetwork, peers: list[MemoryTransport], reply: object, reason: str
) -> None:
    good = state_frames("evil", round=1)
    if reply == "tamper":
        frames = [good[0], good[1][:-1] + bytes([good[1][-1] ^ 1])]
    elif reply == "nan":
        frames = wire.encode_message(
            encode_state({"w": torch.full((3, 2), float("nan")), "b": torch.zeros(2)}),
            info_hash=INFO_HASH,
            sender="evil",
            round=1,
            num_examples=1,
        )
    elif reply == "shape":
        frames = wire.encode_message(
            encode_state({"w": torch.zeros(2, 3), "b": torch.zeros(2)}),
            info_hash=INFO_HASH,
            sender="evil",
            round=1,
            num_examples=1,
        )
    elif reply == "header_only":
        frames = good[:1]
    else:
        frames = reply  # type: ignore[assignment]
    network.add_raw_peer("mem://evil", lambda request: frames)
    with pytest.raises(MessageError) as info:
        peers[0].fetch(
            Endpoint("evil", "mem://evil"), round=1, timeout=1.0, like_state=model_state()
        )
    assert info.value.reason == reason
    assert peers[0].stats.rejections() == {reason: 1}
    # The peer carries on: a good fetch still works.
    peers[1].publish(state_frames("p1", round=1))
    assert peers[0].fetch(endpoint(peers[1]), round=1, timeout=1.0).header.sender == "p1"


def test_bad_requests_are_refused_and_counted(peers: list[MemoryTransport]) -> None:
    server = peers[0]
    server.publish(state_frames("p0", round=1))
    assert wire.decode_header(server._respond([b"\xc1"])[0], info_hash=INFO_HASH).reason == (
        "bad_header"
    )
    assert server.stats.rejections() == {"bad_header": 1}


def test_accounting_matches_frame_sizes(peers: list[MemoryTransport]) -> None:
    server, client = peers[0], peers[1]
    frames = state_frames("p0", round=7)
    server.publish(frames)
    client.fetch(endpoint(server), round=3, timeout=1.0)
    request_len = len(wire.encode_request(info_hash=INFO_HASH, sender="p1", round=3)[0])
    header_len, payload_len = len(frames[0]), len(frames[1])

    seen_by_client = client.stats.snapshot()
    assert seen_by_client["per_peer_round"] == [
        {
            "peer": "p0",
            "round": 3,  # the client's own round
            "header_sent": request_len,
            "payload_sent": 0,
            "header_received": header_len,
            "payload_received": payload_len,
            "messages_sent": 1,
            "messages_received": 1,
        }
    ]
    assert [r for r, _ in seen_by_client["rtt_s"]["p0"]] == [3]
    seen_by_server = server.stats.snapshot()
    assert seen_by_server["per_round"]["7"] == {  # the round of the state served
        "header_sent": header_len,
        "payload_sent": payload_len,
        "header_received": request_len,
        "payload_received": 0,
        "messages_sent": 1,
        "messages_received": 1,
    }
    json.dumps(seen_by_client)
    json.dumps(seen_by_server)


def test_stats_pool_peers_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_base, "_MAX_TRACKED_PEERS", 3)
    stats = TrafficStats()
    for i in range(5):
        stats.record_sent(f"peer{i}", 0, header=10)
    per_peer = stats.snapshot()["per_peer"]
    assert set(per_peer) == {"peer0", "peer1", "peer2", transport_base.OTHER}
    assert per_peer[transport_base.OTHER]["header_sent"] == 20


@pytest.mark.parametrize(
    "kwargs",
    [
        {"info_hash": "xyz", "peer_id": "p"},
        {"info_hash": INFO_HASH, "peer_id": ""},
        {"info_hash": INFO_HASH, "peer_id": "p", "piece_bytes": 10},
        {"info_hash": INFO_HASH, "peer_id": "p", "max_concurrent_fetches": 0},
        {"info_hash": INFO_HASH, "peer_id": "p", "request_rate": 0.0},
        {"info_hash": INFO_HASH, "peer_id": "p", "request_rate": float("nan")},
        {"info_hash": INFO_HASH, "peer_id": "p", "request_burst": 0},
        {"info_hash": INFO_HASH, "peer_id": "p", "max_requesters": 2},
        {"info_hash": INFO_HASH, "peer_id": "p", "curve_secret_key": b"x" * 40},
        {
            "info_hash": INFO_HASH,
            "peer_id": "p",
            "curve_secret_key": b"x",
            "curve_public_key": b"y",
        },
    ],
)
def test_config_is_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        TransportConfig(**kwargs)  # type: ignore[arg-type]


# -- flood limits ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_spends_tokens_on_repeats_only() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=10.0, burst=5, max_keys=16, clock=clock)
    # A new state each time is never limited.
    assert all(limiter.allow("a", state=(r, "d")) for r in range(1000))
    # Asking again for the state it has: a burst of 5, then one per 1/rate seconds.
    assert [limiter.allow("a", state=(999, "d")) for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.1
    assert [limiter.allow("a", state=(999, "d")) for _ in range(2)] == [True, False]
    # Before anything is published every request is a repeat; another requester is apart.
    assert [limiter.allow("b", state=None) for _ in range(6)] == [True] * 5 + [False]
    # A connection pays for every request; a refusal by one bucket takes no token from another.
    assert all(limiter.allow(f"c{i}", connection="x", state=(0, "d")) for i in range(5))
    assert not limiter.allow("c5", connection="x", state=(0, "d"))
    assert not limiter.allow("a", connection="y", state=(999, "d"))  # "a" is empty
    assert all(limiter.allow(f"d{i}", connection="y", state=(0, "d")) for i in range(5))


def test_rate_limiter_memory_is_bounded_and_forgotten_keys_start_full() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=2, max_keys=16, clock=clock)
    assert [limiter.allow("first", state=None) for _ in range(3)] == [True, True, False]
    for i in range(1000):
        limiter.allow(f"sybil{i}", connection=f"conn{i}", state=None)
    assert len(limiter) == 16
    assert limiter.allow("first", state=None)  # forgotten, so full again


def test_honest_pulling_never_reaches_the_default_limit() -> None:
    """The pull loop's backoff, as ``node.exchange`` runs it, against the default buckets."""
    from fedtorrent.node.exchange import POLL_FIRST_S, POLL_MAX_S

    defaults = TransportConfig(info_hash=INFO_HASH, peer_id="p")
    clock = FakeClock()
    limiter = RateLimiter(
        rate=defaults.request_rate, burst=defaults.request_burst, max_keys=16, clock=clock
    )
    # Worst case: every answer is stale and each round is over after its first backoff step,
    # so the puller repeats every POLL_FIRST_S, for a minute.
    for step in range(int(60 / POLL_FIRST_S)):
        clock.now = step * POLL_FIRST_S
        assert limiter.allow("worst", state=(0, "stale")), f"refused at {clock.now:.2f} s"
    # A neighbour behind for a whole 10 s exchange, round after round: backoff to POLL_MAX_S.
    clock.now = 0.0
    for round in range(1, 20):
        delay, end = POLL_FIRST_S, clock.now + 10.0
        while clock.now < end:
            assert limiter.allow("behind", state=(round - 1, "old"))
            clock.now += delay
            delay = min(2 * delay, POLL_MAX_S)
        assert limiter.allow("behind", state=(round, "new"))


def test_each_state_is_reported_once_per_requester_and_to_a_bounded_number(
    network: MemoryNetwork,
) -> None:
    server = MemoryTransport(network, TransportConfig(info_hash=INFO_HASH, peer_id="p0"))
    events: list[ServedEvent] = []
    server.on_served = events.append
    requesters = MAX_LOGGED_REQUESTERS + 44
    with server:
        server.publish(state_frames("p0", round=1))
        for _ in range(2):
            for i in range(requesters):
                request = wire.encode_request(info_hash=INFO_HASH, sender=f"c{i}", round=1)
                assert len(server._respond(request)) == 2  # the state, not a refusal
        assert [e.requester for e in events] == [f"c{i}" for i in range(MAX_LOGGED_REQUESTERS)] + [
            None
        ]
        assert server.stats.snapshot()["serving"] == {
            "served": 2 * requesters,
            "repeat": MAX_LOGGED_REQUESTERS,
            "pooled": 2 * 44,
        }
        server.publish(state_frames("p0", round=2))  # a new state: everyone is news again
        server._respond(wire.encode_request(info_hash=INFO_HASH, sender="c0", round=2))
    assert [(e.requester, e.header.round) for e in events[-1:]] == [("c0", 2)]
    assert len(events) == MAX_LOGGED_REQUESTERS + 2


def test_a_flooding_requester_is_refused_and_an_honest_one_still_served(
    peers: list[MemoryTransport],
) -> None:
    server, flooder, honest = peers[0], peers[1], peers[2]
    server.publish(state_frames("p0", round=1))
    outcomes: Counter[str] = Counter()
    for _ in range(2000):
        try:
            flooder.fetch(endpoint(server), round=1, timeout=1.0)
            outcomes["ok"] += 1
        except PeerRefusedError as exc:
            outcomes[exc.kind] += 1
    burst = server.config.request_burst
    assert outcomes["ok"] >= 1 + burst
    assert outcomes["refused:rate_limited"] >= 1000  # 2,000 back to back take far under 10 s
    assert server.stats.rejections() == {"rate_limited": outcomes["refused:rate_limited"]}
    assert server.stats.snapshot()["rejections_per_peer"] == {
        "p1": {"rate_limited": outcomes["refused:rate_limited"]}
    }
    assert flooder.stats.snapshot()["failures"] == {
        "p0": {"refused:rate_limited": outcomes["refused:rate_limited"]}
    }
    assert honest.fetch(endpoint(server), round=1, timeout=1.0).header.round == 1
    server.publish(state_frames("p0", round=2))  # its next state it may have at once
    assert flooder.fetch(endpoint(server), round=2, timeout=1.0).header.round == 2
