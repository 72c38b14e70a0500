"""The ZeroMQ transport for real, on 127.0.0.1: fetches, deadlines, hostile peers, accounting."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import zmq

from fedtorrent.errors import MessageError, NetworkError
from fedtorrent.net import wire
from fedtorrent.net.transport import (
    Endpoint,
    FetchTimeoutError,
    PeerRefusedError,
    ServedEvent,
    TransportConfig,
    ZmqTransport,
)
from fedtorrent.net.transport.base import MAX_LOGGED_REQUESTERS
from fedtorrent.net.transport.zmq import BufferPool
from fedtorrent.state import encode_state

INFO_HASH = "ab" * 32

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]


def model_state(fill: float = 0.0, size: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(fill * 10))
    return {"w": torch.randn(size, 100, generator=gen) + fill, "b": torch.full((100,), fill)}


def state_frames(peer_id: str, round: int, fill: float = 1.0, size: int = 64) -> list[bytes]:
    return wire.encode_message(
        encode_state(model_state(fill, size)),
        info_hash=INFO_HASH,
        sender=peer_id,
        round=round,
        num_examples=10,
    )


def config(peer_id: str, **kw: Any) -> TransportConfig:
    return TransportConfig(info_hash=INFO_HASH, peer_id=peer_id, piece_bytes=4096, **kw)


@pytest.fixture
def pair() -> Iterator[tuple[ZmqTransport, ZmqTransport]]:
    with ZmqTransport(config("server")) as server, ZmqTransport(config("client")) as client:
        yield server, client


def endpoint(t: ZmqTransport, **kw: Any) -> Endpoint:
    return Endpoint(peer_id=t.config.peer_id, address=t.address, **kw)


def free_port() -> int:
    """A port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fetch_in_many_pieces(pair: tuple[ZmqTransport, ZmqTransport]) -> None:
    server, client = pair
    frames = state_frames("server", round=3, fill=2.0, size=200)  # ~80 KB: 20 pieces of 4 KiB
    server.publish(frames)
    reply = client.fetch(endpoint(server), round=2, timeout=5.0)
    assert reply.header.round == 3 and reply.state is None
    assert bytes(reply.payload) == frames[1]
    reply = client.fetch(endpoint(server), round=2, timeout=5.0, like_state=model_state(size=200))
    assert reply.state is not None
    assert torch.equal(reply.state["w"], model_state(2.0, 200)["w"])
    reply.state["w"] += 1  # decoded tensors are writable and private


def test_a_kept_state_survives_later_fetches(pair: tuple[ZmqTransport, ZmqTransport]) -> None:
    # Decoded tensors are views into a pooled receive buffer: it must not be reused while they live.
    server, client = pair
    like = model_state(size=200)
    server.publish(state_frames("server", round=1, fill=1.0, size=200))
    first = client.fetch(endpoint(server), round=1, timeout=5.0, like_state=like)
    assert first.finite == {"w", "b"}  # checked while the pieces arrived
    server.publish(state_frames("server", round=2, fill=3.0, size=200))
    second = client.fetch(endpoint(server), round=2, timeout=5.0, like_state=like)
    assert first.state is not None and second.state is not None
    assert torch.equal(first.state["w"], model_state(1.0, 200)["w"])
    assert torch.equal(second.state["w"], model_state(3.0, 200)["w"])


def test_buffer_pool_reuses_only_free_buffers() -> None:
    pool = BufferPool(keep=2)
    first = pool.take(1000)
    view = memoryview(first.data)  # what a reply's payload and its tensors hold
    tensor = torch.frombuffer(view, dtype=torch.uint8)
    del first, view
    second = pool.take(1000)
    assert second.ctypes.data != tensor.data_ptr()  # the first is still in use through the tensor
    address = second.ctypes.data
    del second
    third = pool.take(1000)
    assert third.ctypes.data == address  # free again: reused
    assert pool.take(999).ctypes.data not in (address, tensor.data_ptr())  # sizes never mix
    del tensor
    assert pool.take(1000).ctypes.data != address  # the third is still held here


def test_buffer_pool_hands_one_buffer_to_one_thread() -> None:
    pool = BufferPool(keep=4)
    taken: list[Any] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def take() -> None:
        barrier.wait(timeout=10)
        buffer = pool.take(4096)
        with lock:
            taken.append(buffer)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len({b.ctypes.data for b in taken}) == 8


def test_not_ready_then_ready(pair: tuple[ZmqTransport, ZmqTransport]) -> None:
    server, client = pair
    with pytest.raises(NetworkError, match="not_ready"):
        client.fetch(endpoint(server), round=0, timeout=5.0)
    server.publish(state_frames("server", round=1))
    assert client.fetch(endpoint(server), round=0, timeout=5.0).header.round == 1


def test_a_silent_peer_costs_at_most_the_deadline_and_a_dead_one_nothing(
    pair: tuple[ZmqTransport, ZmqTransport],
) -> None:
    server, client = pair
    server.publish(state_frames("server", round=1))
    with ZmqTransport(config("other")) as other, socket.socket() as listener:
        other.publish(state_frames("other", round=1))
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts the TCP connection, never speaks ZMTP
        cohort = [
            endpoint(server),
            endpoint(other),
            Endpoint("silent", f"tcp://127.0.0.1:{listener.getsockname()[1]}"),
            Endpoint("dead", f"tcp://127.0.0.1:{free_port()}"),
        ]
        start = time.monotonic()
        result = client.fetch_many(cohort, round=1, timeout=0.5, like_state=model_state())
        elapsed = time.monotonic() - start
    assert set(result.replies) == {"server", "other"}
    assert isinstance(result.failures["silent"], FetchTimeoutError)
    assert getattr(result.failures["dead"], "kind", None) == "unreachable"
    assert 0.4 <= elapsed < 1.5


def test_a_refused_connection_fails_at_once(pair: tuple[ZmqTransport, ZmqTransport]) -> None:
    _, client = pair
    start = time.monotonic()
    with pytest.raises(NetworkError, match="unreachable"):
        client.fetch(Endpoint("dead", f"tcp://127.0.0.1:{free_port()}"), round=0, timeout=5.0)
    assert time.monotonic() - start < 1.0  # not the 5 s deadline: ZeroMQ would retry quietly
    assert client.stats.snapshot()["failures"] == {"dead": {"unreachable": 1}}


def test_concurrent_clients(pair: tuple[ZmqTransport, ZmqTransport]) -> None:
    server, _ = pair
    frames = state_frames("server", round=4, size=100)
    server.publish(frames)
    clients = [ZmqTransport(config(f"c{i}")) for i in range(4)]
    results: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def run(c: ZmqTransport) -> None:
        try:
            for _ in range(3):
                results[c.config.peer_id] = bytes(
                    c.fetch(endpoint(server), round=4, timeout=10.0).payload
                )
        except BaseException as exc:
            errors.append(exc)

    for c in clients:
        c.start()
    try:
        threads = [threading.Thread(target=run, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for c in clients:
            c.close()
    assert not errors
    assert results == {f"c{i}": frames[1] for i in range(4)}
    assert server.stats.snapshot()["totals"]["payload_sent"] == 12 * len(frames[1])


def raw_request(address: str, frames: list[bytes], timeout_ms: int = 5000) -> list[bytes]:
    """Send frames from a bare DEALER and return the first reply message."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "server did not answer"
        return list(sock.recv_multipart())
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"\xc1"], "bad_header"),
        ([b"garbage", b"more", b"frames"], "bad_frames"),
        ([b"\x81\xa1v\x02"], "version"),
        (wire.encode_request(info_hash="cd" * 32, sender="x", round=0), "wrong_session"),
        (state_frames("client", round=0)[:1], "bad_header"),  # a state is not a request
    ],
)
def test_server_rejects_bad_requests_and_keeps_serving(
    pair: tuple[ZmqTransport, ZmqTransport], frames: list[bytes], reason: str
) -> None:
    server, client = pair
    server.publish(state_frames("server", round=1))
    reply = raw_request(server.address, frames)
    assert len(reply) == 1
    assert wire.decode_header(reply[0], info_hash=INFO_HASH).reason == reason
    assert server.stats.rejections() == {reason: 1}
    assert client.fetch(endpoint(server), round=1, timeout=5.0).header.sender == "server"


def test_server_drops_oversized_requests_and_keeps_serving(
    pair: tuple[ZmqTransport, ZmqTransport],
) -> None:
    server, client = pair
    server.publish(state_frames("server", round=1))
    with pytest.raises(AssertionError, match="did not answer"):
        raw_request(server.address, [b"x" * (wire.MAX_HEADER_BYTES + 1)], timeout_ms=300)
    assert client.fetch(endpoint(server), round=1, timeout=5.0).header.sender == "server"


class FakeServer:
    """A bare ROUTER that answers every request with scripted messages (a hostile peer)."""

    def __init__(self, script: Callable[[], list[list[bytes]]]) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.address = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.script = script
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve)

    def _serve(self) -> None:
        while not self.stop.is_set():
            if self.router.poll(50):
                identity, *_ = self.router.recv_multipart()
                for message in self.script():
                    self.router.send_multipart([identity, *message])

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.router.close()
        self.context.term()


def scripted(kind: str) -> list[list[bytes]]:
    header, payload = state_frames("evil", round=1)
    if kind == "tampered":
        return [[header], [payload[:-1] + bytes([payload[-1] ^ 1])]]
    if kind == "too_long_piece":
        return [[header], [payload + b"extra"]]
    if kind == "multi_frame_piece":
        return [[header], [payload[:10], payload[10:]]]
    if kind == "header_with_payload":
        return [[header, payload]]
    if kind == "nan":
        bad = {"w": torch.full((64, 100), float("nan")), "b": torch.zeros(100)}
        return [
            [m]
            for m in wire.encode_message(
                encode_state(bad), info_hash=INFO_HASH, sender="evil", round=1, num_examples=1
            )
        ]
    if kind == "wrong_shape":
        bad = {"w": torch.zeros(100, 64), "b": torch.zeros(100)}
        return [
            [m]
            for m in wire.encode_message(
                encode_state(bad), info_hash=INFO_HASH, sender="evil", round=1, num_examples=1
            )
        ]
    if kind == "oversized":
        return [[header + b"\x00" * wire.MAX_HEADER_BYTES]]
    if kind == "truncated":
        return [[header], [payload[:100]]]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("tampered", "bad_digest"),
        ("too_long_piece", "bad_frames"),
        ("multi_frame_piece", "bad_frames"),
        ("header_with_payload", "bad_frames"),
        ("nan", "non_finite"),
        ("wrong_shape", "bad_shape"),
        ("oversized", "oversized"),
    ],
)
def test_client_rejects_bad_replies(
    pair: tuple[ZmqTransport, ZmqTransport], kind: str, reason: str
) -> None:
    server, client = pair
    server.publish(state_frames("server", round=1))
    with FakeServer(lambda: scripted(kind)) as fake, pytest.raises(MessageError) as info:
        client.fetch(Endpoint("evil", fake.address), round=1, timeout=5.0, like_state=model_state())
    assert info.value.reason == reason
    assert client.stats.rejections() == {reason: 1}
    assert client.fetch(endpoint(server), round=1, timeout=5.0).header.sender == "server"


def test_truncated_reply_times_out(pair: tuple[ZmqTransport, ZmqTransport]) -> None:
    _, client = pair
    with FakeServer(lambda: scripted("truncated")) as fake:
        with pytest.raises(FetchTimeoutError):
            client.fetch(Endpoint("evil", fake.address), round=1, timeout=0.3)
        received = client.stats.snapshot()["per_peer"]["evil"]
    assert received["payload_received"] == 100


def test_accounting_matches_frame_sizes(pair: tuple[ZmqTransport, ZmqTransport]) -> None:
    server, client = pair
    frames = state_frames("server", round=8, size=100)
    server.publish(frames)
    for round in (1, 2):
        client.fetch(endpoint(server), round=round, timeout=5.0)
    request_len = len(wire.encode_request(info_hash=INFO_HASH, sender="client", round=1)[0])
    client_view = client.stats.snapshot()
    for round in ("1", "2"):
        assert client_view["per_round"][round] == {
            "header_sent": request_len,
            "payload_sent": 0,
            "header_received": len(frames[0]),
            "payload_received": len(frames[1]),
            "messages_sent": 1,
            "messages_received": 1,
        }
    assert [r for r, _ in client_view["rtt_s"]["server"]] == [1, 2]
    assert all(0 < s < 5 for _, s in client_view["rtt_s"]["server"])
    server_view = server.stats.snapshot()
    assert server_view["per_peer"]["client"] == {
        "header_sent": 2 * len(frames[0]),
        "payload_sent": 2 * len(frames[1]),
        "header_received": 2 * request_len,
        "payload_received": 0,
        "messages_sent": 2,
        "messages_received": 2,
    }
    assert list(server_view["per_round"]) == ["8"]


def test_close_returns_promptly_with_a_fetch_in_flight() -> None:
    client = ZmqTransport(config("client"))
    client.start()
    errors: list[BaseException] = []
    started = threading.Event()

    def fetch() -> None:
        started.set()
        try:
            client.fetch(Endpoint("dead", f"tcp://127.0.0.1:{free_port()}"), round=0, timeout=30)
        except NetworkError as exc:
            errors.append(exc)

    thread = threading.Thread(target=fetch)
    thread.start()
    started.wait(5)  # close must be prompt whether the fetch is waiting or about to
    start = time.monotonic()
    client.close()
    thread.join(5)
    assert time.monotonic() - start < 2.0
    assert not thread.is_alive() and len(errors) == 1


def test_binding_a_taken_port_is_a_network_error(pair: tuple[ZmqTransport, ZmqTransport]) -> None:
    server, _ = pair
    clash = ZmqTransport(TransportConfig(info_hash=INFO_HASH, peer_id="x", bind=server.address))
    with pytest.raises(NetworkError, match="cannot bind"):
        clash.start()


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CurveZMQ")
def test_curve_encrypted_link() -> None:
    public, secret = zmq.curve_keypair()
    server = ZmqTransport(config("server", curve_secret_key=secret, curve_public_key=public))
    with server, ZmqTransport(config("client")) as client:
        server.publish(state_frames("server", round=1))
        reply = client.fetch(endpoint(server, public_key=public), round=1, timeout=5.0)
        assert reply.header.sender == "server"
        # Without the server's key, or with a wrong one, the handshake fails: nothing is
        # exchanged, and the fetch ends at once instead of at its deadline.
        for key in (None, zmq.curve_keypair()[0]):
            start = time.monotonic()
            with pytest.raises(NetworkError, match="handshake_failed"):
                client.fetch(endpoint(server, public_key=key), round=1, timeout=5.0)
            assert time.monotonic() - start < 2.0


def test_client_refuses_a_payload_over_its_limit_before_allocating(
    pair: tuple[ZmqTransport, ZmqTransport],
) -> None:
    server, _ = pair
    frames = state_frames("server", round=1)
    server.publish(frames)
    with ZmqTransport(config("small", max_payload_bytes=len(frames[1]) - 1)) as small:
        with pytest.raises(MessageError) as info:
            small.fetch(endpoint(server), round=1, timeout=5.0)
        assert info.value.reason == "oversized"
        assert small.stats.snapshot()["per_peer"]["server"]["payload_received"] == 0


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CurveZMQ")
def test_a_flood_of_valid_requests_is_refused_counted_and_reported_once() -> None:
    """2,000 fetches from one CurveZMQ key, each on a new connection, as a fetcher makes them."""
    server_public, server_secret = zmq.curve_keypair()
    flood_public, flood_secret = zmq.curve_keypair()
    server = ZmqTransport(
        config("server", curve_secret_key=server_secret, curve_public_key=server_public)
    )
    events: list[ServedEvent] = []
    server.on_served = events.append
    flooder = ZmqTransport(
        config("flooder", curve_secret_key=flood_secret, curve_public_key=flood_public)
    )
    with server, flooder, ZmqTransport(config("honest")) as honest:
        server.publish(state_frames("server", round=1, size=4))
        target = endpoint(server, public_key=server_public)
        outcomes: Counter[str] = Counter()
        started = time.monotonic()
        for _ in range(2000):
            try:
                flooder.fetch(target, round=1, timeout=5.0)
                outcomes["ok"] += 1
            except PeerRefusedError as exc:
                outcomes[exc.kind] += 1
        elapsed = time.monotonic() - started
        refused = outcomes["refused:rate_limited"]
        assert outcomes["ok"] + refused == 2000
        # The first is free (a new state), then the burst, then request_rate a second.
        limit = server.config
        assert 1 + limit.request_burst <= outcomes["ok"]
        assert outcomes["ok"] <= 1 + limit.request_burst + limit.request_rate * elapsed + 1
        assert server.stats.rejections() == {"rate_limited": refused}
        assert flooder.stats.snapshot()["failures"] == {"server": {"refused:rate_limited": refused}}
        assert server.stats.snapshot()["serving"] == {
            "served": outcomes["ok"],
            "repeat": outcomes["ok"] - 1,
            "pooled": 0,
        }
        # An honest fetcher still gets the state; the flooder gets the next one at once.
        assert honest.fetch(target, round=1, timeout=5.0).header.sender == "server"
        server.publish(state_frames("server", round=2, size=4))
        assert flooder.fetch(target, round=2, timeout=5.0).header.round == 2
    assert [(e.requester, e.header.round) for e in events] == [
        ("flooder", 1),
        ("honest", 1),
        ("flooder", 2),
    ]


def test_one_connection_cycling_ids_is_limited_per_connection(
    pair: tuple[ZmqTransport, ZmqTransport],
) -> None:
    """Without Curve, a new declared id per request gets around the requester's bucket, not the
    connection's."""
    server, client = pair
    events: list[ServedEvent] = []
    server.on_served = events.append
    server.publish(state_frames("server", round=1, size=4))  # one piece: header + 1 message
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(server.address)
    answers: Counter[str] = Counter()
    try:
        for i in range(2000):
            sock.send_multipart(wire.encode_request(info_hash=INFO_HASH, sender=f"s{i}", round=1))
            assert sock.poll(5000), "server did not answer"
            header = wire.decode_header(sock.recv(), info_hash=INFO_HASH)
            if header.kind == "state":
                assert sock.poll(5000)
                sock.recv()
            answers[header.kind if header.kind == "state" else header.reason] += 1
    finally:
        sock.close()
    assert answers["rate_limited"] >= 1000
    assert answers["state"] + answers["rate_limited"] == 2000
    assert len(events) == answers["state"] <= MAX_LOGGED_REQUESTERS
    assert client.fetch(endpoint(server), round=1, timeout=5.0).header.sender == "server"
