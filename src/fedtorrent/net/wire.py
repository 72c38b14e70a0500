"""The envelope peers exchange: a small msgpack header, then (for states) a safetensors payload.

Frames: ``[header]`` for requests and errors, ``[header, payload]`` for states. Bytes from a peer
are hostile, so checks run cheapest first and nothing large is allocated before its size is known:
frame count, header size, msgpack types and field ranges, protocol version, info-hash, payload size,
then the payload's length and sha256, and only then the tensors, which must have exactly the keys,
shapes and dtypes of the session's model and hold only finite values. Every failure is a
``MessageError`` whose ``reason`` is one of ``REASONS``, so a peer can count rejections by cause.
Nothing here ever unpickles.

A ``hello`` introduces a peer to one that found it through a standard BitTorrent tracker, which
lists addresses only: its peer id, Ed25519 key and data port, signed by that key
(``identity.signed_hello``), sent on the plain hello socket in answer to a ``hello_request``.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from fedtorrent.errors import ConfigError, MessageError, StateError
from fedtorrent.state.codec import MAX_STATE_BYTES, check_state_like

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 4096
"""A header is a few hundred bytes; anything past this is refused before msgpack sees it."""
MAX_TENSOR_HEADER_BYTES = 8 << 20
"""Upper bound on the JSON header inside a safetensors payload (about 50k tensors)."""

KINDS = ("state", "request", "error", "hello_request", "hello")
REASONS = (
    "bad_frames",  # wrong number of frames, or frames that are not bytes
    "bad_header",  # not a msgpack map, unknown or missing fields, wrong types or ranges
    "oversized",  # header or payload larger than the limit
    "version",  # another protocol version
    "wrong_session",  # another info-hash
    "wrong_sender",  # a reply from a peer other than the one asked
    "bad_digest",  # payload length or sha256 differs from the header
    "bad_payload",  # not valid safetensors
    "bad_shape",  # keys, shapes or dtypes differ from the session's model
    "non_finite",  # NaN or infinite values
    "not_ready",  # (sent by a server) nothing published yet
    "unsigned",  # a state without a signature and nonce, or from a peer that announced no key
    "bad_signature",  # the signature does not verify with the sender's announced key
    "replay",  # an old round, a reused nonce, or a round past the end of the session
    "not_allowed",  # (a handshake) a CurveZMQ key outside the closed swarm's allow-list
    "rate_limited",  # (sent by a server) this requester asked too often; ask again later
    "gone",  # (sent by a server) this peer is leaving the swarm: do not wait for it
    "implausible",  # (after decoding) too far from the receiver's own model (mixing.screen)
    "bad_compressed",  # a compressed payload that breaks its format (state.compress)
    "key_changed",  # (a hello) a key other than the one already known for that peer id
)

_MAX_INT = 2**53
_MAX_ID_CHARS = 128
_MAX_REASON_CHARS = 64
_BYTES_LIMITS = {"sig": 128, "nonce": 64, "pubkey": 64}
_EXACT_BYTES = {"hello": {"sig": 64, "pubkey": 32}}
"""Kinds whose byte fields have one exact length."""
_COMMON = ("v", "kind", "info_hash", "sender", "round")
_REQUIRED = {
    "state": (*_COMMON, "num_examples", "payload_len", "payload_sha256"),
    "request": _COMMON,
    "error": (*_COMMON, "reason"),
    "hello_request": _COMMON,
    "hello": (*_COMMON, "pubkey", "port", "sig"),
}
_OPTIONAL = {
    "state": ("sig", "nonce", "pubkey", "codec", "base"),
    "request": ("sig", "nonce", "pubkey", "base"),
    "error": (),
    "hello_request": (),
    "hello": (),
}
_MAX_CODEC_CHARS = 32
_HEX = frozenset("0123456789abcdef")

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

State = dict[str, torch.Tensor]
_Entry = tuple[int, int, str, torch.dtype, tuple[int, ...]]
"""A tensor's (begin, end) data offsets, name, dtype and shape in a safetensors payload."""
_NUMPY_FLOATS: dict[torch.dtype, Any] = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
}


@dataclass(frozen=True)
class Header:
    """The decoded header; which fields matter depends on ``kind``.

    ``sig``, ``nonce`` and ``pubkey`` are carried but not checked here: the peer checks the
    signature (Ed25519 over info-hash, round, sender, ``payload_sha256`` and nonce; see
    ``fedtorrent.net.identity``) against the key the sender announced.
    """

    kind: str
    info_hash: str
    sender: str
    round: int
    num_examples: int = 0
    payload_len: int = 0
    payload_sha256: str = ""
    reason: str = ""
    sig: bytes | None = None
    nonce: bytes | None = None
    pubkey: bytes | None = None
    version: int = PROTOCOL_VERSION
    codec: str | None = None
    """``state``: how the payload encodes the sender's public copy (``state.compress``): None
    (absent) for a whole safetensors state, else the session's compression spelling, the payload
    then holding the updates from round ``base`` to ``round``."""
    base: int | None = None
    """``state`` with ``codec``: the round of the public copy the updates apply to; ``request``:
    the round of the server's public copy the requester holds (absent: none)."""
    port: int = 0
    """``hello``: the TCP port where the sender serves its state (on the hello's host)."""


@dataclass(frozen=True)
class Message:
    """A state message that passed every check: its header and its tensors."""

    header: Header
    state: State = field(repr=False)


def reject(reason: str, text: str) -> MessageError:
    """Build the MessageError for ``reason`` (one of REASONS)."""
    return MessageError(f"{reason}: {text}", reason=reason)


# ---------------------------------------------------------------------------------------------
# Encoding (our own messages; bad arguments are a ConfigError, not a peer's fault)


def encode_header(header: Header) -> bytes:
    """Pack a header, omitting the fields its kind does not carry."""
    fields: dict[str, Any] = {
        "v": header.version,
        "kind": header.kind,
        "info_hash": header.info_hash,
        "sender": header.sender,
        "round": header.round,
        "num_examples": header.num_examples,
        "payload_len": header.payload_len,
        "payload_sha256": header.payload_sha256,
        "reason": header.reason,
        "sig": header.sig,
        "nonce": header.nonce,
        "pubkey": header.pubkey,
        "codec": header.codec,
        "base": header.base,
        "port": header.port or None,
    }
    allowed = _REQUIRED.get(header.kind, ()) + _OPTIONAL.get(header.kind, ())
    fields = {k: v for k, v in fields.items() if k in allowed and v is not None}
    try:
        _check_fields(fields)
    except MessageError as exc:
        raise ConfigError(f"cannot encode header: {exc}") from None
    raw: bytes = msgpack.packb(fields, use_bin_type=True)
    if len(raw) > MAX_HEADER_BYTES:
        raise ConfigError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    return raw


def encode_message(
    payload: bytes,
    *,
    info_hash: str,
    sender: str,
    round: int,
    num_examples: int,
    sig: bytes | None = None,
    nonce: bytes | None = None,
    pubkey: bytes | None = None,
    payload_sha256: str | None = None,
    codec: str | None = None,
    base: int | None = None,
) -> list[bytes]:
    """Frames ``[header, payload]`` for a state; ``payload`` comes from ``encode_state``.

    Pass ``payload_sha256`` when it is already known (say, to sign it) so that a large payload
    is hashed once; it must be ``state_digest(payload)``. With ``codec`` (and ``base``) the
    payload holds compressed updates instead (``state.compress``).
    """
    header = Header(
        kind="state",
        info_hash=info_hash,
        sender=sender,
        round=round,
        num_examples=num_examples,
        payload_len=len(payload),
        payload_sha256=payload_sha256 or hashlib.sha256(payload).hexdigest(),
        sig=sig,
        nonce=nonce,
        pubkey=pubkey,
        codec=codec,
        base=base,
    )
    return [encode_header(header), payload]


def encode_request(
    *, info_hash: str, sender: str, round: int, base: int | None = None
) -> list[bytes]:
    """Frames ``[header]`` asking a peer for its current state; ``round`` is the asker's.

    ``base``: the round of that peer's public copy the asker holds (compressed sessions).
    """
    header = Header(kind="request", info_hash=info_hash, sender=sender, round=round, base=base)
    return [encode_header(header)]


def encode_error(*, info_hash: str, sender: str, round: int, reason: str) -> list[bytes]:
    """Frames ``[header]`` telling a peer why its request was refused."""
    header = Header(kind="error", info_hash=info_hash, sender=sender, round=round, reason=reason)
    return [encode_header(header)]


def encode_hello_request(*, info_hash: str, sender: str) -> list[bytes]:
    """Frames ``[header]`` asking whoever listens at an address to introduce itself."""
    header = Header(kind="hello_request", info_hash=info_hash, sender=sender, round=0)
    return [encode_header(header)]


def encode_hello(
    *, info_hash: str, sender: str, pubkey: bytes, port: int, sig: bytes
) -> list[bytes]:
    """Frames ``[header]`` of a hello (``identity.signed_hello`` makes ``sig``)."""
    header = Header(
        kind="hello",
        info_hash=info_hash,
        sender=sender,
        round=0,
        pubkey=pubkey,
        port=port,
        sig=sig,
    )
    return [encode_header(header)]


# ---------------------------------------------------------------------------------------------
# Decoding (hostile input; every failure is a MessageError with a reason)


def decode_header(
    raw: bytes | bytearray | memoryview,
    *,
    info_hash: str,
    max_payload_bytes: int = MAX_STATE_BYTES,
) -> Header:
    """Check and unpack one header frame: size, msgpack types, version, session, payload size.

    Raises:
        MessageError: reason ``oversized``, ``bad_header``, ``version`` or ``wrong_session``.
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise reject("bad_frames", f"header frame is {type(raw).__name__}, not bytes")
    if len(raw) > MAX_HEADER_BYTES:
        raise reject("oversized", f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        fields = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise reject("bad_header", f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(fields, dict):
        raise reject("bad_header", f"header is a {type(fields).__name__}, not a map")
    _check_fields(fields)
    if fields["info_hash"] != info_hash.lower():
        raise reject("wrong_session", f"info-hash {fields['info_hash'][:16]}... is another session")
    if fields.get("payload_len", 0) > max_payload_bytes:
        raise reject(
            "oversized", f"payload of {fields['payload_len']} bytes exceeds {max_payload_bytes}"
        )
    return Header(
        kind=fields["kind"],
        info_hash=fields["info_hash"],
        sender=fields["sender"],
        round=fields["round"],
        num_examples=fields.get("num_examples", 0),
        payload_len=fields.get("payload_len", 0),
        payload_sha256=fields.get("payload_sha256", ""),
        reason=fields.get("reason", ""),
        sig=fields.get("sig"),
        nonce=fields.get("nonce"),
        pubkey=fields.get("pubkey"),
        version=fields["v"],
        codec=fields.get("codec"),
        base=fields.get("base"),
        port=fields.get("port", 0),
    )


def decode_request(frames: Sequence[Any], *, info_hash: str) -> Header:
    """Check a request: one frame, a ``request`` header of this session.

    Raises:
        MessageError: any reason ``decode_header`` gives, or ``bad_frames``.
    """
    return decode_single(frames, info_hash=info_hash, kind="request")


def decode_single(frames: Sequence[Any], *, info_hash: str, kind: str) -> Header:
    """Check a one-frame message of ``kind`` (``request``, ``hello_request``, ``hello``).

    Raises:
        MessageError: any reason ``decode_header`` gives, ``bad_frames``, or ``bad_header``
            for another kind (a peer's ``error`` raises too: the caller reads its reason).
    """
    if not isinstance(frames, Sequence) or len(frames) != 1:
        raise reject("bad_frames", f"a {kind} has 1 frame, got {_count(frames)}")
    header = decode_header(as_buffer(frames[0]), info_hash=info_hash)
    if header.kind != kind:
        raise reject("bad_header", f"expected a {kind}, got {header.kind!r}")
    return header


def verify_payload(
    header: Header,
    payload: bytes | bytearray | memoryview,
    *,
    computed_sha256: str | None = None,
) -> None:
    """Check the payload's length and sha256 against the header.

    Args:
        header: a decoded ``state`` header.
        payload: the payload bytes.
        computed_sha256: the digest, when the caller already hashed these bytes itself while
            receiving them (never a digest that came from the peer).

    Raises:
        MessageError: reason ``bad_digest``.
    """
    if len(payload) != header.payload_len:
        raise reject(
            "bad_digest", f"payload has {len(payload)} bytes, header says {header.payload_len}"
        )
    digest = computed_sha256 or hashlib.sha256(payload).hexdigest()
    if digest != header.payload_sha256:
        raise reject("bad_digest", "payload sha256 differs from the header")


def decode_payload(
    payload: bytes | bytearray | memoryview,
    *,
    like_state: Mapping[str, torch.Tensor] | None,
    finite: frozenset[str] = frozenset(),
) -> State:
    """Parse safetensors bytes into tensors and check them against the session's model.

    Tensors are views into ``payload`` when it is writable (no copy: the transport hands over a
    buffer it owns, reused only once nothing refers to it) and into one private copy when it is
    read-only, so a decoded state never aliases immutable ``bytes``. With ``like_state=None``
    only parsing and finiteness are checked. ``finite`` names tensors this process already found
    finite while receiving (:meth:`FiniteScan.cleared`), never names a peer sent.

    Raises:
        MessageError: reason ``bad_payload``, ``bad_shape`` or ``non_finite``.
    """
    view = memoryview(payload).cast("B")
    if view.readonly:
        view = memoryview(bytearray(view))
    state = _parse_safetensors(view)
    if like_state is not None:
        try:
            check_state_like(state, like_state)
        except StateError as exc:
            raise reject("bad_shape", str(exc)) from None
    for key, tensor in state.items():
        if tensor.is_floating_point() and key not in finite and not _all_finite(tensor):
            raise reject("non_finite", f"tensor {key!r} holds NaN or infinite values")
    return state


def decode_message(
    frames: Sequence[Any],
    *,
    info_hash: str,
    like_state: Mapping[str, torch.Tensor] | None,
    max_bytes: int = MAX_STATE_BYTES,
    computed_sha256: str | None = None,
) -> Message:
    """Check and decode ``[header, payload]`` frames of a state message, cheapest checks first.

    Raises:
        MessageError: with one of ``REASONS``.
    """
    if not isinstance(frames, Sequence) or len(frames) != 2:
        raise reject("bad_frames", f"a state message has 2 frames, got {_count(frames)}")
    header = decode_header(as_buffer(frames[0]), info_hash=info_hash, max_payload_bytes=max_bytes)
    if header.kind != "state":
        raise reject("bad_header", f"expected a state, got {header.kind!r}")
    payload = as_buffer(frames[1])
    if len(payload) > max_bytes:
        raise reject("oversized", f"payload of {len(payload)} bytes exceeds {max_bytes}")
    verify_payload(header, payload, computed_sha256=computed_sha256)
    return Message(header=header, state=decode_payload(payload, like_state=like_state))


# ---------------------------------------------------------------------------------------------
# Helpers


def _count(frames: object) -> str:
    return str(len(frames)) if isinstance(frames, Sequence) else type(frames).__name__


def as_buffer(frame: object) -> memoryview:
    """A flat byte view of one frame (bytes, bytearray, memoryview or a zmq.Frame)."""
    if isinstance(frame, str):
        raise reject("bad_frames", "frame is a str, not bytes")
    try:
        return memoryview(frame).cast("B")  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise reject("bad_frames", f"frame is not a byte buffer ({exc})") from None


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_text(value: object, max_chars: int) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= max_chars
        and value.isascii()
        and value.isprintable()
    )


def _is_hex64(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def is_info_hash(value: object) -> bool:
    """True for 64 lowercase hex characters, the form every info-hash takes on the wire."""
    return _is_hex64(value)


def is_peer_id(value: object) -> bool:
    """True for 1 to 128 printable ASCII characters."""
    return _is_text(value, _MAX_ID_CHARS)


def _check_fields(fields: dict[Any, Any]) -> None:
    """Version first (a future layout may differ), then kind, key set, and each field's type."""
    if fields.get("v") != PROTOCOL_VERSION:
        version = fields.get("v")
        shown = version if _is_int(version, -_MAX_INT, _MAX_INT) else type(version).__name__
        raise reject("version", f"protocol version {shown}, expected {PROTOCOL_VERSION}")
    kind = fields.get("kind")
    if kind not in KINDS:
        raise reject("bad_header", f"unknown kind {str(kind)[:32]!r}")
    required, optional = _REQUIRED[kind], _OPTIONAL[kind]
    missing = [k for k in required if k not in fields]
    unknown = [str(k)[:32] for k in fields if k not in required and k not in optional]
    if missing or unknown:
        raise reject("bad_header", f"{kind} header missing {missing}, unexpected {unknown}")
    checks: dict[str, Callable[[object], bool]] = {
        "info_hash": is_info_hash,
        "sender": is_peer_id,
        "round": lambda v: _is_int(v, 0, _MAX_INT),
        "num_examples": lambda v: _is_int(v, 0, _MAX_INT),
        "payload_len": lambda v: _is_int(v, 0, _MAX_INT),
        "payload_sha256": _is_hex64,
        "reason": lambda v: _is_text(v, _MAX_REASON_CHARS),
        "codec": lambda v: _is_text(v, _MAX_CODEC_CHARS),
        "base": lambda v: _is_int(v, 0, _MAX_INT),
        "port": lambda v: _is_int(v, 1, 65535),
    }
    for key, ok in checks.items():
        if key in fields and not ok(fields[key]):
            raise reject("bad_header", f"field {key!r} is invalid")
    for key, limit in _BYTES_LIMITS.items():
        value = fields.get(key)
        if value is not None and not (isinstance(value, bytes) and 0 < len(value) <= limit):
            raise reject("bad_header", f"field {key!r} must be 1 to {limit} bytes")
    for key, size in _EXACT_BYTES.get(kind, {}).items():
        if len(fields[key]) != size:
            raise reject("bad_header", f"field {key!r} of a {kind} must be {size} bytes")
    if kind == "state" and ("codec" in fields) != ("base" in fields):
        raise reject("bad_header", "a compressed state needs both codec and base")
    if kind == "state" and "base" in fields and fields["base"] > fields["round"]:
        raise reject("bad_header", "a compressed state's base is past its round")


def _layout(view: memoryview) -> tuple[int, list[_Entry]]:
    """The data's offset and the entries sorted by position, checked against the format's rules.

    Contiguous, non-overlapping, no trailing bytes: what the safetensors library enforces.
    """
    total = len(view)
    if total < 8:
        raise reject("bad_payload", "shorter than a safetensors header")
    (header_len,) = struct.unpack_from("<Q", view, 0)
    if header_len > min(total - 8, MAX_TENSOR_HEADER_BYTES):
        raise reject("bad_payload", f"safetensors header length {header_len} does not fit")
    try:
        meta = json.loads(bytes(view[8 : 8 + header_len]))
    except (ValueError, RecursionError):
        raise reject("bad_payload", "safetensors header is not JSON") from None
    if not isinstance(meta, dict):
        raise reject("bad_payload", "safetensors header is not an object")
    metadata = meta.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise reject("bad_payload", "safetensors __metadata__ is not a map of strings")
    data_start, data_len = 8 + header_len, total - 8 - header_len
    entries = sorted((_tensor_entry(name, info, data_len) for name, info in meta.items()))
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            raise reject("bad_payload", f"tensor {name[:64]!r} overlaps or leaves a gap")
        position = end
    if position != data_len:
        raise reject("bad_payload", "safetensors data has trailing bytes")
    return data_start, entries


def _parse_safetensors(view: memoryview) -> State:
    """Zero-copy safetensors reader with the format's own rules (contiguous, non-overlapping).

    ``fedtorrent.state.decode_state`` copies the payload twice and checks finiteness with a
    temporary mask; at 100 MB that costs more than the transfer itself, hence this reader.
    """
    data_start, entries = _layout(view)
    everything = torch.frombuffer(view, dtype=torch.uint8)
    if everything.data_ptr() % 16:  # a view into an odd offset: align once rather than per tensor
        everything = everything.clone()
    state: State = {}
    for begin, end, name, dtype, shape in entries:
        raw = everything[data_start + begin : data_start + end]
        if dtype == torch.bool and raw.numel() and int(raw.max()) > 1:
            raise reject("bad_payload", f"bool tensor {name[:64]!r} holds values other than 0/1")
        try:
            typed = raw.view(dtype)
        except RuntimeError:  # misaligned for this dtype: one private, aligned copy
            typed = raw.clone().view(dtype)
        state[name] = typed.reshape(shape)
    return state


def _tensor_entry(name: object, info: object, data_len: int) -> _Entry:
    if not isinstance(name, str) or not isinstance(info, dict):
        raise reject("bad_payload", "safetensors entry is not name -> object")
    if set(info) != {"dtype", "shape", "data_offsets"} or not (
        isinstance(info["dtype"], str) and info["dtype"] in _DTYPES
    ):
        raise reject("bad_payload", f"tensor {name[:64]!r} has a malformed or unknown entry")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (
        isinstance(shape, list)
        and len(shape) <= 16
        and all(_is_int(d, 0, _MAX_INT) for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o, 0, data_len) for o in offsets)
    ):
        raise reject("bad_payload", f"tensor {name[:64]!r} has a bad shape or offsets")
    dtype = _DTYPES[info["dtype"]]
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if offsets[1] - offsets[0] != nbytes:
        raise reject("bad_payload", f"tensor {name[:64]!r} offsets do not match its shape")
    return offsets[0], offsets[1], name, dtype, tuple(shape)


def _all_finite(tensor: torch.Tensor) -> bool:
    """One pass and no temporary mask: a sum is NaN or infinite if any term is.

    A finite sum clears the tensor; only a non-finite one (or an overflow of huge finite values)
    pays for the exact min and max, which propagate NaN and expose +-inf.

    numpy does it single-threaded; torch's threaded reduction pays milliseconds of thread wake-up
    per tensor on a busy machine. numpy has no bfloat16, so that one stays in torch.
    """
    if tensor.numel() == 0:
        return True
    if tensor.dtype == torch.bfloat16:
        low, high = (float(v) for v in torch.aminmax(tensor.reshape(-1)))
    else:
        values = tensor.reshape(-1).numpy()
        if _sum_is_finite(values):
            return True
        low, high = float(values.min()), float(values.max())
    return math.isfinite(low) and math.isfinite(high)


def _sum_is_finite(values: np.ndarray[Any, Any]) -> bool:
    # float16 would overflow at 65504: add it up in float32.
    wide = np.float32 if values.dtype == np.float16 else None
    with np.errstate(over="ignore", invalid="ignore"):  # the answer, not a warning
        return math.isfinite(float(np.add.reduce(values, dtype=wide)))


class FiniteScan:
    """Checks a payload's float tensors for NaN and infinity piece by piece, as it arrives.

    Called on each piece right after it was copied in and hashed, while it is still in this
    core's cache, the check costs a fraction of a pass over the finished payload after the
    transfer (about 6 ms at 100 MB here); :func:`decode_payload` skips the tensors it cleared.
    It only clears, never rejects: a tensor whose sum is not finite, and a payload whose header
    does not parse, are left to :func:`decode_payload`, which gives the reason.
    """

    def __init__(self, payload: memoryview) -> None:
        self._payload = payload.cast("B") if payload.format != "B" else payload
        self._ranges: list[tuple[int, int, str, Any]] | None = None
        self._next = 0
        """Index of the first range not yet scanned to its end."""
        self._position = 0
        """Bytes of that range (absolute offset) already scanned."""
        self._failed: set[str] = set()
        self._gave_up = False

    def feed(self, received: int) -> None:
        """Scan what ``payload[:received]`` adds since the last call."""
        if self._gave_up:
            return
        if self._ranges is None and not self._read_header(received):
            return
        assert self._ranges is not None
        while self._next < len(self._ranges):
            begin, end, name, dtype = self._ranges[self._next]
            start = max(self._position, begin)
            stop = min(end, received)
            stop -= (stop - begin) % dtype.itemsize  # whole elements only
            if stop > start:
                if not _sum_is_finite(np.frombuffer(self._payload[start:stop], dtype=dtype)):
                    self._failed.add(name)
                self._position = stop
            if stop < end:
                return
            self._next += 1

    def cleared(self) -> frozenset[str]:
        """Float tensors scanned to their end and found finite."""
        if self._ranges is None:
            return frozenset()
        done = {name for _, _, name, _ in self._ranges[: self._next]}
        return frozenset(done - self._failed)

    def _read_header(self, received: int) -> bool:
        if received < 8:
            return False
        (header_len,) = struct.unpack_from("<Q", self._payload, 0)
        if received < 8 + min(header_len, len(self._payload)):
            return False
        try:
            data_start, entries = _layout(self._payload)
        except MessageError:
            self._gave_up = True
            return False
        self._ranges = [
            (data_start + begin, data_start + end, name, np.dtype(_NUMPY_FLOATS[dtype]))
            for begin, end, name, dtype, _ in entries
            if dtype in _NUMPY_FLOATS and end > begin
        ]
        return True
