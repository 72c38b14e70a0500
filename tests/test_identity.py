"""Peer identity keys, signed updates and the replay guard."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import zmq

from fedtorrent.errors import ConfigError, MessageError, ReplayError, SignatureError
from fedtorrent.net.identity import (
    CURVE_PUBLIC_FILE,
    PUBLIC_FILE,
    SEED_FILE,
    PeerIdentity,
    ReplayGuard,
    curve_public_key,
    load_or_create_identity,
    new_nonce,
    sign_update,
    verify_update,
)

INFO_HASH = "ab" * 32
DIGEST = "cd" * 32


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Any:
    """A umask that would leave new files world-readable, to prove the code sets modes itself."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_key_folder_and_files_are_private_and_reload_identically(
    tmp_path: Path, open_umask: None
) -> None:
    key_dir = tmp_path / "keys" / "peer0"
    first = load_or_create_identity(key_dir)
    assert mode(key_dir) == 0o700
    for name in (SEED_FILE, PUBLIC_FILE, CURVE_PUBLIC_FILE):
        assert mode(key_dir / name) == 0o600
    assert sorted(p.name for p in key_dir.iterdir()) == sorted(
        [SEED_FILE, PUBLIC_FILE, CURVE_PUBLIC_FILE]
    )  # the temporary file is gone
    second = load_or_create_identity(key_dir)
    assert second.public_key == first.public_key
    assert second.curve_secret == first.curve_secret
    assert (key_dir / PUBLIC_FILE).read_text().strip() == first.public_key_hex
    assert (key_dir / CURVE_PUBLIC_FILE).read_text().strip() == first.curve_public.decode()
    assert load_or_create_identity(tmp_path / "other").public_key != first.public_key


def test_loose_or_malformed_key_files_are_refused(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    (tmp_path / SEED_FILE).chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_identity(tmp_path)
    (tmp_path / SEED_FILE).write_text("not hex\n")
    (tmp_path / SEED_FILE).chmod(0o600)
    with pytest.raises(ConfigError, match="Ed25519 seed"):
        load_or_create_identity(tmp_path)


def test_curve_keys_derive_from_the_signing_key() -> None:
    identity = PeerIdentity.from_seed(bytes(range(32)))
    assert len(identity.curve_public) == len(identity.curve_secret) == 40
    assert zmq.curve_public(identity.curve_secret) == identity.curve_public
    assert curve_public_key(identity.public_key_hex) == identity.curve_public
    assert curve_public_key(identity.public_key) == identity.curve_public
    assert PeerIdentity.from_seed(bytes(range(32))).public_key == identity.public_key
    with pytest.raises(ConfigError):
        curve_public_key("zz" * 32)
    with pytest.raises(ConfigError):
        PeerIdentity.from_seed(b"short")


def fields(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "info_hash": INFO_HASH,
        "round": 3,
        "sender": "peer-a",
        "receiver": "peer-b",
        "payload_sha256": DIGEST,
        "nonce": b"\x01" * 16,
    }
    return {**base, **changes}


def test_signed_update_verifies() -> None:
    identity = PeerIdentity.from_seed(b"\x07" * 32)
    signature = sign_update(identity.signing_key, **fields())
    assert len(signature) == 64
    verify_update(identity.public_key, signature, **fields())
    verify_update(identity.public_key_hex, signature, **fields())
    assert sign_update(identity, **fields()) == signature  # a PeerIdentity signs the same
    broadcast = sign_update(identity, **fields(receiver=None))
    verify_update(identity.public_key, broadcast, **fields(receiver=None))


@pytest.mark.parametrize(
    "change",
    [
        {"info_hash": "ef" * 32},
        {"round": 4},
        {"sender": "peer-c"},
        {"receiver": "peer-c"},
        {"receiver": None},
        {"payload_sha256": "ce" * 32},
        {"nonce": b"\x02" * 16},
    ],
)
def test_signature_fails_on_any_changed_field(change: dict[str, Any]) -> None:
    identity = PeerIdentity.from_seed(b"\x07" * 32)
    signature = sign_update(identity, **fields())
    with pytest.raises(SignatureError):
        verify_update(identity.public_key, signature, **fields(**change))


def test_wrong_key_or_mangled_signature_fails() -> None:
    identity = PeerIdentity.from_seed(b"\x07" * 32)
    other = PeerIdentity.from_seed(b"\x08" * 32)
    signature = sign_update(identity, **fields())
    with pytest.raises(SignatureError):
        verify_update(other.public_key, signature, **fields())
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    for bad in (flipped, signature[:-1], b""):
        with pytest.raises(SignatureError):
            verify_update(identity.public_key, bad, **fields())
    with pytest.raises(SignatureError):
        verify_update(b"\x00" * 31, signature, **fields())


@pytest.mark.parametrize(
    "change",
    [
        {"round": -1},
        {"round": True},
        {"sender": ""},
        {"receiver": 5},
        {"payload_sha256": "CD" * 32},
        {"payload_sha256": "cd"},
        {"nonce": b"\x00" * 4},
        {"nonce": "text"},
        {"info_hash": "x" * 1000},
    ],
)
def test_malformed_fields_are_message_errors(change: dict[str, Any]) -> None:
    identity = PeerIdentity.from_seed(b"\x07" * 32)
    with pytest.raises(MessageError):
        sign_update(identity, **fields(**change))


def test_replay_guard_rejects_reused_nonces_and_old_rounds() -> None:
    guard = ReplayGuard(window=1)
    first = new_nonce()
    guard.admit("a", round=5, nonce=first)
    with pytest.raises(ReplayError, match="nonce"):
        guard.admit("a", round=5, nonce=first)
    with pytest.raises(ReplayError, match="nonce"):
        guard.admit("a", round=6, nonce=first)  # a nonce is never reusable, even a round later
    guard.admit("b", round=5, nonce=first)  # nonces are per sender
    guard.admit("a", round=4, nonce=new_nonce())  # one round late is inside the window
    guard.admit("a", round=7, nonce=new_nonce())
    assert guard.newest_round("a") == 7 and guard.newest_round("z") is None
    with pytest.raises(ReplayError, match="round 5"):
        guard.admit("a", round=5, nonce=new_nonce())
    assert guard.rejected == 3


def test_replay_guard_forgets_only_rounds_it_refuses_and_bounds_memory() -> None:
    guard = ReplayGuard(window=0, max_per_round=2)
    old = new_nonce()
    guard.admit("a", round=1, nonce=old)
    guard.admit("a", round=2, nonce=new_nonce())
    with pytest.raises(ReplayError):  # round 1's nonce is forgotten, but round 1 is refused
        guard.admit("a", round=1, nonce=old)
    guard.admit("a", round=2, nonce=new_nonce())
    with pytest.raises(ReplayError, match="more than 2"):
        guard.admit("a", round=2, nonce=new_nonce())
    with pytest.raises(ConfigError):
        ReplayGuard(window=-1)


@pytest.mark.network
@pytest.mark.timeout(20)
def test_derived_keys_complete_a_curvezmq_handshake() -> None:
    server_id, client_id = PeerIdentity.generate(), PeerIdentity.generate()
    context = zmq.Context()
    server, client = context.socket(zmq.REP), context.socket(zmq.REQ)
    try:
        for sock in (server, client):
            sock.setsockopt(zmq.LINGER, 0)
        server.curve_server = True
        server.curve_secretkey = server_id.curve_secret
        server.curve_publickey = server_id.curve_public
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.curve_serverkey = curve_public_key(server_id.public_key_hex)
        client.curve_secretkey = client_id.curve_secret
        client.curve_publickey = client_id.curve_public
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"ping")
        assert server.poll(10_000) and server.recv() == b"ping"
        server.send(b"pong")
        assert client.poll(10_000) and client.recv() == b"pong"
    finally:
        server.close()
        client.close()
        context.term()
