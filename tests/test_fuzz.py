"""Hostile input, generated: the torrent reader, the tracker's announce parameters, and the parts
of the message path ``test_wire.py`` does not already fuzz (requests, signed headers).

Each property: no crash, no hang (a per-example deadline), and only the documented error:
``TorrentError`` for torrents, ``RequestRejected`` (HTTP 400) for announces, ``MessageError``
with a ``wire.REASONS`` code for messages. Examples are derandomized, so runs are repeatable.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import fastbencode
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtorrent.config import DataConfig, MixingConfig, ModelConfig, TrackerConfig, TrainConfig
from fedtorrent.errors import MessageError, TorrentError
from fedtorrent.net import wire
from fedtorrent.net.identity import PeerIdentity, UpdateVerifier, new_nonce, sign_update
from fedtorrent.net.torrent import Session, Torrent, load_torrent
from fedtorrent.net.tracker.registry import ANNOUNCE_PARAMS, RequestRejected, parse_announce
from fedtorrent.net.transport import Reply
from fedtorrent.node.compressed import CompressedSender, Replicas, encode_updates
from fedtorrent.state.compress import Compression

FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=1),
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
INFO_HASH = "c3" * 32
ALICE = PeerIdentity.from_seed(bytes(range(32)))

bencode_values = st.recursive(
    st.integers(-(2**70), 2**70) | st.binary(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.binary(max_size=12), inner),
    max_leaves=25,
)


def torrent() -> Torrent:
    session = Session(
        name="fuzz",
        model=ModelConfig("logreg", {}),
        data=DataConfig(dataset="digits", num_nodes=3),
        train=TrainConfig(),
        mixing=MixingConfig(rule="fixed"),
        rounds=5,
        cohort_size=2,
        state_sha256="ab" * 32,
        state_size=100,
        allow_keys=(ALICE.public_key_hex,),
    )
    return Torrent(announce="http://127.0.0.1:6969/announce", session=session, comment="c")


VALID_TORRENT = torrent().to_bytes()


def only_torrent_errors(payload: bytes) -> None:
    try:
        parsed = load_torrent(payload)
    except TorrentError:
        return
    assert Torrent.from_bytes(parsed.to_bytes()) == parsed  # whatever is accepted round-trips


# -- torrents ------------------------------------------------------------------------------------


def test_the_fuzzed_torrent_is_valid_and_closed() -> None:
    loaded = Torrent.from_bytes(VALID_TORRENT)
    assert loaded.session.closed and loaded.session.allow_keys == (ALICE.public_key_hex,)


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_torrent_arbitrary_bytes(payload: bytes) -> None:
    only_torrent_errors(payload)


@FUZZ
@given(st.data())
def test_fuzz_torrent_mutated_bytes(data: st.DataObject) -> None:
    payload = bytearray(VALID_TORRENT)
    for _ in range(data.draw(st.integers(1, 6))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    only_torrent_errors(bytes(payload[:cut]) + data.draw(st.binary(max_size=8)))


@FUZZ
@given(st.data())
def test_fuzz_torrent_fields_replaced_by_any_bencode_value(data: st.DataObject) -> None:
    """Well-formed bencode, wrong in one place: a field of the top, of info or of a section."""
    meta = fastbencode.bdecode(VALID_TORRENT)
    info = meta[b"info"]
    target = data.draw(st.sampled_from([meta, info, info[b"train"], info[b"data"]]))
    key = data.draw(st.sampled_from([*sorted(target), b"allow_keys", b"unknown"]))
    target[key] = data.draw(bencode_values)
    only_torrent_errors(fastbencode.bencode(meta))


@FUZZ
@given(st.lists(st.text(alphabet="0123456789abcdefABCDEF", max_size=70), max_size=4))
def test_fuzz_torrent_allow_lists(keys: list[str]) -> None:
    meta = fastbencode.bdecode(VALID_TORRENT)
    meta[b"info"][b"allow_keys"] = [key.encode() for key in keys]
    only_torrent_errors(fastbencode.bencode(meta))


# -- tracker announce parameters -----------------------------------------------------------------

names = st.sampled_from(sorted(ANNOUNCE_PARAMS)) | st.text(max_size=12)
values = st.text(max_size=80) | st.sampled_from(["", "0", "-1", "1e999", "nan", "65536", "1.5"])
VALID_QUERY = {
    "info_hash": INFO_HASH,
    "peer_id": "peer-1",
    "port": "4000",
    "event": "started",
    "round": "3",
    "numwant": "5",
    "accuracy": "0.5",
    "bytes_sent": "10",
    "bytes_received": "20",
    "pubkey": ALICE.public_key_hex,
    "ip": "10.0.0.2",
    "compact": "1",
    "format": "bencode",
}


def only_rejections(pairs: list[tuple[str, str]], source: str = "127.0.0.1") -> None:
    try:
        announce = parse_announce(pairs, source=source, config=TrackerConfig())
    except RequestRejected as exc:
        assert exc.status == 400 and exc.reason
        return
    assert announce.info_hash == dict(pairs)["info_hash"].lower()
    assert 1 <= announce.port <= 65535


def test_the_fuzzed_query_is_valid() -> None:
    only_rejections(list(VALID_QUERY.items()))


@FUZZ
@given(st.lists(st.tuples(names, values), max_size=16))
def test_fuzz_announce_arbitrary_pairs(pairs: list[tuple[str, str]]) -> None:
    only_rejections(pairs)


@FUZZ
@given(st.data())
def test_fuzz_announce_one_bad_value(data: st.DataObject) -> None:
    query = dict(VALID_QUERY)
    for name in data.draw(
        st.lists(st.sampled_from(sorted(query)), min_size=1, max_size=3, unique=True)
    ):
        if data.draw(st.booleans()):
            query[name] = data.draw(values)
        else:
            del query[name]
    source = data.draw(st.sampled_from(["127.0.0.1", "203.0.113.9", "::1"]))
    only_rejections(list(query.items()), source)


# -- requests and signed headers -----------------------------------------------------------------

msgpack_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=70)
    | st.binary(max_size=80)
)


def reason(error: MessageError) -> str:
    assert error.reason in wire.REASONS, error.reason
    return error.reason


@FUZZ
@given(st.lists(st.binary(max_size=300) | st.text(max_size=20) | st.none(), max_size=3))
def test_fuzz_requests(frames: list[Any]) -> None:
    try:
        header = wire.decode_request(frames, info_hash=INFO_HASH)
    except MessageError as exc:
        reason(exc)
        return
    assert header.kind == "request"


def signed_header(**changes: Any) -> dict[str, Any]:
    payload_sha256, nonce = "9f" * 32, new_nonce()
    fields: dict[str, Any] = {
        "v": wire.PROTOCOL_VERSION,
        "kind": "state",
        "info_hash": INFO_HASH,
        "sender": "alice",
        "round": 2,
        "num_examples": 5,
        "payload_len": 10,
        "payload_sha256": payload_sha256,
        "nonce": nonce,
        "pubkey": ALICE.public_key,
    }
    fields["sig"] = sign_update(
        ALICE,
        info_hash=INFO_HASH,
        round=2,
        sender="alice",
        receiver=None,
        payload_sha256=payload_sha256,
        nonce=nonce,
    )
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def test_an_untouched_signed_header_is_accepted_once_then_only_as_the_same_update() -> None:
    verifier = UpdateVerifier(info_hash=INFO_HASH, last_round=10)
    raw = msgpack.packb(signed_header(), use_bin_type=True)
    header = wire.decode_header(raw, info_hash=INFO_HASH)
    verifier.verify(header, ALICE.public_key_hex)
    verifier.verify(header, ALICE.public_key_hex)  # asked again: the same update, not a replay
    again = wire.decode_header(
        msgpack.packb(signed_header(), use_bin_type=True), info_hash=INFO_HASH
    )
    verifier.verify(again, ALICE.public_key_hex)  # the same round signed anew: a fresh nonce
    with pytest.raises(MessageError) as info:  # the first one is no longer the latest: a replay
        verifier.verify(header, ALICE.public_key_hex)
    assert info.value.reason == "replay"
    with pytest.raises(MessageError) as info:
        verifier.verify(header, None)
    assert info.value.reason == "unsigned"


def _alice_state(round: int) -> wire.Header:
    nonce = new_nonce()
    sig = sign_update(ALICE, info_hash=INFO_HASH, round=round, sender="alice", receiver=None,
                      payload_sha256="9f" * 32, nonce=nonce)  # fmt: skip
    fields = {**signed_header(), "round": round, "nonce": nonce, "sig": sig}
    return wire.decode_header(msgpack.packb(fields, use_bin_type=True), info_hash=INFO_HASH)


def test_an_admitted_state_may_come_again_inside_the_window_but_not_after() -> None:
    """A neighbour ahead serves a requester of round r the state it published for r earlier."""
    verifier = UpdateVerifier(info_hash=INFO_HASH, last_round=10)
    states = {r: _alice_state(r) for r in (1, 2, 3)}
    for r in (1, 2, 3):
        verifier.verify(states[r], ALICE.public_key_hex)
    verifier.verify(states[2], ALICE.public_key_hex)  # round 2 >= newest 3 - window 1: fine
    verifier.verify(states[3], ALICE.public_key_hex)
    with pytest.raises(MessageError) as info:  # round 1 is out of the window now
        verifier.verify(states[1], ALICE.public_key_hex)
    assert info.value.reason == "replay"


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["sig", "nonce", "pubkey", "round", "sender", "payload_sha256"]),
        msgpack_values,
        min_size=1,
    ),
    st.sampled_from([ALICE.public_key_hex, ALICE.public_key, "00" * 32, "zz", b"", None]),
)
def test_fuzz_signed_headers(changes: dict[str, Any], key: Any) -> None:
    """A signed header with fields replaced: refused with a reason, or it really is Alice's."""
    verifier = UpdateVerifier(info_hash=INFO_HASH, last_round=10)
    fields = {**signed_header(), **changes}
    try:
        header = wire.decode_header(msgpack.packb(fields, use_bin_type=True), info_hash=INFO_HASH)
        verifier.verify(header, key)
    except MessageError as exc:
        reason(exc)
        return
    # Accepted: every signed field is what Alice signed, under her key.
    assert key in (ALICE.public_key_hex, ALICE.public_key)
    assert (header.round, header.sender, header.payload_sha256) == (2, "alice", "9f" * 32)
    assert header.pubkey in (None, ALICE.public_key)


json_texts = st.recursive(
    st.integers(-(2**200), 2**200) | st.text(max_size=8) | st.booleans() | st.none(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=30,
)


@FUZZ
@given(st.data())
def test_fuzz_torrent_model_kwargs_any_json_any_depth(data: st.DataObject) -> None:
    """Deep, wide or huge JSON in the model's kwargs: a TorrentError, never RecursionError."""
    import json

    meta = fastbencode.bdecode(VALID_TORRENT)
    depth = data.draw(st.sampled_from([0, 1, 15, 17, 1000, 30_000]))
    inner = json.dumps(data.draw(json_texts), separators=(",", ":"), sort_keys=True)
    text = '{"k":' + "[" * depth + inner + "]" * depth + "}"
    meta[b"info"][b"model"][b"kwargs"] = text.encode()
    only_torrent_errors(fastbencode.bencode(meta))


@FUZZ
@given(st.integers(-(2**300), 2**300), st.sampled_from(["rounds", "cohort_size", "date"]))
def test_fuzz_torrent_integers_of_any_size(value: int, field: str) -> None:
    meta = fastbencode.bdecode(VALID_TORRENT)
    if field == "date":
        meta[b"creation date"] = value
    else:
        meta[b"info"][field.encode()] = value
    only_torrent_errors(fastbencode.bencode(meta))


# -- compressed replies (node.compressed) ----------------------------------------------------------


def _compressed_reply(payload: bytes, *, round: int, base: int) -> Reply:
    header = wire.decode_header(
        wire.encode_message(
            payload, info_hash="ab" * 32, sender="p", round=round, num_examples=1,
            codec="topk:0.1,int8", base=base,
        )[0],
        info_hash="ab" * 32,
    )  # fmt: skip
    return Reply(peer_id="p", header=header, payload=memoryview(payload), rtt_s=0.0)


def _replicas() -> Replicas:
    like = {"w": torch.zeros(40, 10), "b": torch.zeros(10)}
    return Replicas(Compression.parse("topk:0.1,int8"), like, mix=("b", "w"), max_bytes=1 << 16)


def _valid_updates(rounds: int) -> bytes:
    sender = CompressedSender(Compression.parse("topk:0.1,int8"), torch.zeros(410))
    for r in range(1, rounds + 1):
        sender.update(torch.randn(410, generator=torch.Generator().manual_seed(r)), r,
                      generator=torch.Generator().manual_seed(r))  # fmt: skip
    return encode_updates(sender.updates_from()[0], {})


def only_compressed_errors(payload: bytes, *, round: int = 2, base: int = 0) -> None:
    replicas = _replicas()
    try:
        state = replicas.receive("p", _compressed_reply(payload, round=round, base=base))
    except MessageError:
        assert replicas.base("p") == 0  # a rejected reply leaves the copy held as it was
        return
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    assert replicas.base("p") == round


def test_valid_compressed_updates_are_applied() -> None:
    only_compressed_errors(_valid_updates(2))
    replicas = _replicas()
    state = replicas.receive("p", _compressed_reply(_valid_updates(2), round=2, base=0))
    assert set(state) == {"b", "w"} and replicas.base("p") == 2


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_compressed_reply_arbitrary_bytes(payload: bytes) -> None:
    only_compressed_errors(payload)


@FUZZ
@given(st.data())
def test_fuzz_compressed_reply_mutated_bytes(data: st.DataObject) -> None:
    payload = bytearray(_valid_updates(2))
    for _ in range(data.draw(st.integers(1, 6))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    rounds = data.draw(st.sampled_from([(2, 0), (3, 0), (2, 1), (1, 0)]))
    only_compressed_errors(bytes(payload[:cut]), round=rounds[0], base=rounds[1])
