"""What an eavesdropper on the link sees: raw bytes through a real TCP relay between two peers.

The relay is a socket forwarder on 127.0.0.1 that the client dials instead of the server; it
copies bytes both ways and keeps everything it forwarded. With CurveZMQ on, no 64-byte window of
the published float32 parameters (nor the session's info-hash) may appear in that capture; with
Curve off (the control), the parameters are there in the clear, so the check can fail.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import zmq

from fedtorrent.net import wire
from fedtorrent.net.identity import PeerIdentity
from fedtorrent.net.transport import Endpoint, TransportConfig, ZmqTransport
from fedtorrent.state import encode_state

pytestmark = [
    pytest.mark.network,
    pytest.mark.timeout(60),
    pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CurveZMQ"),
]
INFO_HASH = "5e" * 32
WINDOW = 64


class Relay:
    """Accepts connections and forwards each to ``target``, recording both directions."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.lock = threading.Lock()
        self.captured = bytearray()
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> None:
        self.accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            for source, sink in ((client, server), (server, client)):
                thread = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
                thread.start()
                self.threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                with self.lock:
                    self.captured += chunk
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            source.close()  # each socket is the source of exactly one pump

    def close(self) -> None:
        self.listener.close()

    def snapshot(self) -> bytes:
        with self.lock:
            return bytes(self.captured)


def parameters() -> tuple[dict[str, torch.Tensor], list[bytes]]:
    """A seeded float32 state and each tensor's raw bytes (what must stay secret)."""
    generator = torch.Generator().manual_seed(7)
    state = {
        "w": torch.randn(64, 100, generator=generator),
        "b": torch.randn(100, generator=generator),
    }
    return state, [t.contiguous().numpy().tobytes() for t in state.values()]


def windows(secrets: list[bytes]) -> list[bytes]:
    """Every 64-byte window, at every offset, of each tensor's bytes."""
    return [raw[i : i + WINDOW] for raw in secrets for i in range(len(raw) - WINDOW + 1)]


def leaked_windows(secrets: list[bytes], captured: bytes) -> int:
    """How many of the tensors' 64-byte windows occur anywhere in ``captured``."""
    seen = {captured[i : i + WINDOW] for i in range(len(captured) - WINDOW + 1)}
    return sum(window in seen for window in windows(secrets))


@pytest.fixture
def keys() -> Iterator[dict[str, Any]]:
    server, client = PeerIdentity.generate(), PeerIdentity.generate()
    yield {"server": server, "client": client}


def fetch_through_relay(*, curve: bool, keys: dict[str, Any]) -> tuple[bytes, list[bytes], int]:
    """Serve a state, fetch it through a relay; the capture, the secret bytes, and rounds."""
    state, secret = parameters()
    server_id, client_id = keys["server"], keys["client"]
    secure: dict[str, Any] = {}
    client_secure: dict[str, Any] = {}
    if curve:
        secure = {
            "curve_secret_key": server_id.curve_secret,
            "curve_public_key": server_id.curve_public,
            "curve_allow": frozenset({client_id.curve_public}),
        }
        client_secure = {
            "curve_secret_key": client_id.curve_secret,
            "curve_public_key": client_id.curve_public,
        }
    server = ZmqTransport(TransportConfig(info_hash=INFO_HASH, peer_id="server", **secure))
    client = ZmqTransport(TransportConfig(info_hash=INFO_HASH, peer_id="client", **client_secure))
    with server, client:
        server.publish(
            wire.encode_message(
                encode_state(state), info_hash=INFO_HASH, sender="server", round=3, num_examples=9
            )
        )
        port = int(server.address.rsplit(":", 1)[1])
        relay = Relay(("127.0.0.1", port))
        relay.start()
        try:
            endpoint = Endpoint(
                peer_id="server",
                address=f"tcp://127.0.0.1:{relay.port}",
                public_key=server_id.curve_public if curve else None,
            )
            reply = client.fetch(endpoint, round=3, timeout=10.0, like_state=state)
        finally:
            relay.close()
        assert reply.state is not None and torch.equal(reply.state["w"], state["w"])
        captured = relay.snapshot()
    return captured, secret, reply.header.round


def test_with_curve_no_parameter_bytes_cross_the_wire(keys: dict[str, Any]) -> None:
    captured, secret, round = fetch_through_relay(curve=True, keys=keys)
    assert round == 3
    assert len(captured) > sum(map(len, secret))  # the whole state did pass through the relay
    assert leaked_windows(secret, captured) == 0
    assert INFO_HASH.encode() not in captured  # headers are encrypted too
    assert b"server" not in captured and b"client" not in captured  # so are peer ids


def test_control_without_curve_the_parameters_are_in_the_clear(keys: dict[str, Any]) -> None:
    captured, secret, _ = fetch_through_relay(curve=False, keys=keys)
    assert leaked_windows(secret, captured) == len(windows(secret))  # all of it, in the clear
    assert INFO_HASH.encode() in captured
