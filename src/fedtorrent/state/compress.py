"""Compressed model updates: top-k sparsification, fp16/bf16 casts, int8 with stochastic rounding.

What is compressed is the *change* of a flat parameter vector against a reference both sides
hold, never the parameters themselves.

Naive top-k on raw parameters (what p2pfl does) is wrong: keeping the largest 10% of the
*weights* and sending zeros for the rest zeroes 90% of the model every round. The receiver mixes
a model that is mostly zeros; the small weights are never transmitted at all, so the error does
not shrink over rounds, and each round undoes much of what training did.

Error feedback against a shared reference (CHOCO-SGD's public copies, Koloskova et al. 2019) is
not: the sender keeps ``hat``, a public copy of its parameters ``x`` that starts at the initial
state every node knows. Each round it sends ``packet = compress(x - hat)`` and both it and every
receiver apply ``hat += decompress(packet)``, the same float operations on the same numbers, so
their copies stay bit-identical (:class:`PublicCopy`). What was not sent (the coordinates top-k
dropped, the rounding error) stays in the residual ``x - hat`` and competes again next round: a
coordinate left out keeps growing in the residual until it is among the largest and is sent, so
everything is eventually transmitted and ``hat`` tracks ``x``. With ``x`` held fixed, top-k alone
shrinks ``|x - hat|^2`` by a factor of at least ``1 - K/P`` per round (geometrically to zero).
A receiver must apply every packet of a sender, in order, to stay in step.

int8 quantizes each chunk of ``chunk`` kept values with one float32 ``scale = max|v| / 127`` and
``q = floor(v / scale + u)``, ``u ~ U[0, 1)``: stochastic rounding, so ``E[q * scale] = v``
(unbiased: errors average out over rounds and nodes instead of drifting one way) and
``|q * scale - v| < scale`` (at most one quantization step). fp16 and bf16 round to nearest and
saturate at their largest finite value, so a cast never makes an infinity.

Encoded packets (:func:`encode_packet`, one row) are a 16-byte header and three raw sections;
:func:`decode_packet` checks sizes before it allocates anything, then indices, scales and values
(format and checks in ``docs/wire.md``, "Compressed payloads"). Every rejection is a
``MessageError`` whose ``reason`` is one of :data:`REASONS`.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedtorrent.errors import ConfigError, MessageError, StateError

FORMAT_VERSION = 1
HEADER = struct.Struct("<BBBBIII")
"""version, values code, index layout, reserved (0), num_values P, kept K, chunk (int8, else 0)."""
REASONS = ("oversized", "bad_compressed", "non_finite")
"""The ``MessageError.reason`` codes raised here (the wire counts rejections by them)."""

VALUES = ("fp32", "fp16", "bf16", "int8")
"""Value encodings; the position is the code in the header."""
DEFAULT_CHUNK = 256
MAX_CHUNK = 1 << 16
MAX_NUM_VALUES = (1 << 32) - 1
"""P and K travel as uint32."""
INT8_MAX = 127
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
_WIRE = {"fp32": "<f4", "fp16": "<f2", "bf16": "<i2", "int8": "i1"}
"""The numpy dtype each value encoding travels as (bf16 as its raw 16 bits)."""
_MAX_SCALE = float(np.finfo(np.float32).max) / INT8_MAX
"""Larger scales would decode to infinity."""

DENSE, BITMAP, INDICES = 0, 1, 2
"""Index layouts: every coordinate; a bitmap of ceil(P/8) bytes; K sorted uint32 indices."""

_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TOPK = re.compile(rf"topk:({_NUMBER})")
_INT8 = re.compile(r"int8(?::(\d{1,6}))?")
FORMS = "none, fp16, bf16, int8, int8:C, topk:F, topk:F,fp16, topk:F,bf16, topk:F,int8[:C]"


@dataclass(frozen=True)
class Compression:
    """How updates are compressed: an optional top-k fraction, then how values travel.

    Attributes:
        topk: keep this fraction ``0 < F <= 1`` of coordinates (per row, by magnitude); ``None``
            keeps all of them.
        values: ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"int8"``.
        chunk: int8 only: kept values per float32 scale (1 to 65536; other encodings keep the
            default, so that equal specs have one spelling).
    """

    topk: float | None = None
    values: str = "fp32"
    chunk: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        if self.values not in VALUES:
            raise ConfigError(f"compression values {self.values!r} is not one of {VALUES}")
        if self.topk is not None and not (
            isinstance(self.topk, float | int)
            and not isinstance(self.topk, bool)
            and 0 < self.topk <= 1
        ):
            raise ConfigError(f"compression topk must be in (0, 1], got {self.topk!r}")
        if not (type(self.chunk) is int and 1 <= self.chunk <= MAX_CHUNK):
            raise ConfigError(f"compression chunk must be 1 to {MAX_CHUNK}, got {self.chunk!r}")
        if self.values != "int8" and self.chunk != DEFAULT_CHUNK:
            raise ConfigError("compression chunk applies to int8 values only")

    @classmethod
    def parse(cls, text: str) -> Compression:
        """Read a spec such as ``"none"``, ``"int8"``, ``"topk:0.1"`` or ``"topk:0.05,int8"``.

        Raises:
            ConfigError: any other text (the message lists the accepted forms).
        """
        bad = ConfigError(f"compression must be one of {FORMS} (0 < F <= 1); got {text!r}")
        if not isinstance(text, str):
            raise bad
        parts = text.strip().split(",")
        if parts == ["none"]:
            return cls()
        topk: float | None = None
        if (found := _TOPK.fullmatch(parts[0])) is not None:
            topk = float(found.group(1))
            parts = parts[1:]
            if not 0 < topk <= 1:
                raise bad
        if len(parts) > 1 or (topk is None and not parts):
            raise bad
        if not parts:
            return cls(topk=topk)
        if parts[0] in ("fp16", "bf16"):
            return cls(topk=topk, values=parts[0])
        if (found := _INT8.fullmatch(parts[0])) is not None:
            chunk = int(found.group(1) or DEFAULT_CHUNK)
            if not 1 <= chunk <= MAX_CHUNK:
                raise bad
            return cls(topk=topk, values="int8", chunk=chunk)
        raise bad

    def __str__(self) -> str:
        """The canonical spelling: ``Compression.parse(str(spec)) == spec``."""
        parts = [] if self.topk is None else [f"topk:{float(self.topk)!r}"]
        if self.values != "fp32":
            custom = self.values == "int8" and self.chunk != DEFAULT_CHUNK
            parts.append(f"int8:{self.chunk}" if custom else self.values)
        return ",".join(parts) or "none"

    @property
    def is_none(self) -> bool:
        """True when nothing is compressed (every coordinate, as float32)."""
        return self.topk is None and self.values == "fp32"


@dataclass(frozen=True)
class Packet:
    """One compressed update of a ``(P,)`` or ``(N, P)`` float32 tensor (rows independent).

    Attributes:
        spec: how it was compressed.
        num_values: P.
        values: ``(..., K)`` kept values in index order, dtype of ``spec.values`` (int8: the
            quantized integers ``q``).
        indices: ``(..., K)`` int64 indices of the kept coordinates, strictly increasing per row;
            ``None`` when every coordinate is kept (no top-k).
        scales: int8 only: ``(..., ceil(K / chunk))`` float32 scales, one per chunk of values.
    """

    spec: Compression
    num_values: int
    values: Tensor
    indices: Tensor | None = None
    scales: Tensor | None = None

    @property
    def num_kept(self) -> int:
        """K, the kept coordinates per row."""
        return int(self.values.shape[-1])

    def row(self, index: int) -> Packet:
        """The packet of row ``index`` of an ``(N, P)`` packet (what one peer would send)."""
        return Packet(
            spec=self.spec,
            num_values=self.num_values,
            values=self.values[index],
            indices=None if self.indices is None else self.indices[index],
            scales=None if self.scales is None else self.scales[index],
        )


def num_kept(spec: Compression, num_values: int) -> int:
    """K = ceil(F * P) for top-k (F read as the decimal it is written as), else P."""
    if spec.topk is None:
        return num_values
    return math.ceil(Fraction(repr(float(spec.topk))) * num_values)


def num_scales(spec: Compression, kept: int) -> int:
    """Float32 scales of an int8 packet with ``kept`` values (0 for other encodings)."""
    return -(-kept // spec.chunk) if spec.values == "int8" else 0


def index_layout(spec: Compression, num_values: int) -> int:
    """DENSE without top-k, else the smaller of BITMAP (ceil(P/8) bytes) and INDICES (4K bytes).

    A tie goes to the bitmap.
    """
    if spec.topk is None:
        return DENSE
    bitmap = -(-num_values // 8)
    return BITMAP if bitmap <= 4 * num_kept(spec, num_values) else INDICES


def packet_bytes(spec: Compression, num_values: int) -> int:
    """``len(encode_packet(p))`` for every one-row packet ``p`` of ``spec`` and P values."""
    _check_num_values(num_values)
    kept = num_kept(spec, num_values)
    layout = index_layout(spec, num_values)
    index = {DENSE: 0, BITMAP: -(-num_values // 8), INDICES: 4 * kept}[layout]
    itemsize = np.dtype(_WIRE[spec.values]).itemsize
    return HEADER.size + index + 4 * num_scales(spec, kept) + itemsize * kept


# ---------------------------------------------------------------------------------------------
# Compressing and decompressing (our own tensors: bad arguments are a ConfigError)


def compress(
    delta: Tensor,
    spec: Compression,
    *,
    generator: torch.Generator | Sequence[torch.Generator],
) -> Packet:
    """Compress each row of ``delta`` (``(P,)`` or ``(N, P)`` float32, finite) by ``spec``.

    Top-k keeps the ``num_kept(spec, P)`` coordinates of largest ``|delta|`` in each row; among
    equal magnitudes at the cut, the lowest indices. int8 draws ``K`` uniforms per row from
    ``generator`` (CPU generators; the draws are moved to ``delta``'s device, so they do not
    depend on it; other encodings draw nothing). Pass one generator per row to give each row its
    own stream: row ``i`` of an ``(N, P)`` call then gets exactly the packet a one-row call with
    ``generator[i]`` gives. With ``spec.is_none`` the packet holds a copy of ``delta`` itself.

    Raises:
        ConfigError: a tensor of another dtype or rank, non-finite values, or generators that
            do not match the rows.
    """
    _check_vector(delta, "delta")
    if not _all_finite(delta):
        raise ConfigError("cannot compress NaN or infinite values")
    num_values = int(delta.shape[-1])
    if spec.topk is None:
        indices, kept = None, delta
    else:
        indices = top_indices(delta, num_kept(spec, num_values))
        kept = torch.gather(delta, -1, indices)
    scales = None
    if spec.values == "int8":
        uniforms = _uniforms(kept.shape, generator).to(kept.device)
        values, scales = quantize_int8(kept, spec.chunk, uniforms)
    elif spec.values == "fp32":
        values = kept.clone()
    else:
        limit = torch.finfo(_DTYPES[spec.values]).max
        values = kept.clamp(-limit, limit).to(_DTYPES[spec.values])
    return Packet(spec, num_values, values.contiguous(), indices, scales)


def decompress(packet: Packet, num_values: int) -> Tensor:
    """The dense float32 ``(..., P)`` update a packet stands for: zeros where nothing was kept.

    Raises:
        ConfigError: ``num_values`` is not the packet's P.
    """
    if num_values != packet.num_values:
        raise ConfigError(f"packet holds {packet.num_values} values, not {num_values}")
    values = dequantize(packet)
    if packet.indices is None:
        return values
    dense = torch.zeros(*values.shape[:-1], num_values, dtype=torch.float32, device=values.device)
    return dense.scatter_(-1, packet.indices, values)


def top_indices(delta: Tensor, kept: int) -> Tensor:
    """Indices (int64, increasing) of the ``kept`` largest ``|delta|`` per row; ties: lowest index.

    Only the k-th magnitude (the cut) comes from ``torch.topk``, whose choice among equal
    magnitudes is unspecified; which coordinates equal to the cut are kept is decided here, so
    every device picks the same ones.
    """
    magnitude = delta.abs()
    if kept == magnitude.shape[-1]:
        every = torch.arange(kept, device=delta.device)
        return every.expand(magnitude.shape).contiguous()
    cut = torch.topk(magnitude, kept, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    chosen = magnitude >= cut
    if bool((chosen.sum(dim=-1) != kept).any()):  # more than one way to take ties at the cut
        at_cut = magnitude == cut
        missing = kept - (magnitude > cut).sum(dim=-1, keepdim=True)
        chosen = (magnitude > cut) | (at_cut & (torch.cumsum(at_cut, dim=-1) <= missing))
    return chosen.nonzero()[:, -1].reshape(*delta.shape[:-1], kept)


def quantize_int8(values: Tensor, chunk: int, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """Stochastic int8 rounding of ``(..., K)`` float32 values, one scale per ``chunk`` values.

    ``scale = max|v| / 127`` per chunk (0 for an all-zero chunk), ``q = floor(v / scale + u)``
    clamped to [-127, 127] with ``u`` from ``uniforms`` (same shape, in [0, 1)); an all-zero
    chunk gives ``floor(0 + u) = 0``.

    Returns:
        ``q`` (int8, ``(..., K)``) and the scales (float32, ``(..., ceil(K / chunk))``).
    """
    blocks = _blocks(values, chunk)
    scales = blocks.abs().amax(dim=-1) / INT8_MAX
    divisor = torch.where(scales > 0, scales, 1.0).unsqueeze(-1)
    quantized = blocks.div_(divisor).add_(_blocks(uniforms, chunk)).floor_()
    quantized = quantized.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return _unblock(quantized, values.shape[-1]), scales


def dequantize(packet: Packet) -> Tensor:
    """The kept values as float32 ``(..., K)`` (int8: ``q * scale``), a new tensor."""
    if packet.scales is None:
        return packet.values.to(torch.float32, copy=True)
    blocks = _blocks(packet.values.to(torch.float32), packet.spec.chunk)
    return _unblock(blocks.mul_(packet.scales.unsqueeze(-1)), packet.num_kept)


def _blocks(values: Tensor, chunk: int) -> Tensor:
    """``(..., K)`` as ``(..., ceil(K / chunk), chunk)``, zero-padded: always a new tensor."""
    kept = values.shape[-1]
    count = -(-kept // chunk)
    padded = torch.nn.functional.pad(values, (0, count * chunk - kept))
    if padded.data_ptr() == values.data_ptr():
        padded = padded.clone()
    return padded.reshape(*values.shape[:-1], count, chunk)


def _unblock(blocks: Tensor, kept: int) -> Tensor:
    return blocks.reshape(*blocks.shape[:-2], -1)[..., :kept].contiguous()


def _uniforms(shape: torch.Size, generator: torch.Generator | Sequence[torch.Generator]) -> Tensor:
    if isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator)
    rows = math.prod(shape[:-1])
    if len(generator) != rows:
        raise ConfigError(f"{len(generator)} generators for {rows} rows")
    draws = [torch.rand(shape[-1], generator=g) for g in generator]
    return torch.stack(draws).reshape(shape)


def _all_finite(tensor: Tensor) -> bool:
    """One cheap sum (NaN and infinity propagate); exact only when it overflowed or failed."""
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _check_vector(tensor: object, name: str) -> None:
    if not (
        isinstance(tensor, Tensor)
        and tensor.dtype == torch.float32
        and tensor.ndim in (1, 2)
        and tensor.shape[-1] >= 1
    ):
        shown = (
            f"{tuple(tensor.shape)} {tensor.dtype}"
            if isinstance(tensor, Tensor)
            else type(tensor).__name__
        )
        raise ConfigError(
            f"{name} must be a (P,) or (N, P) float32 tensor with P >= 1, got {shown}"
        )
    _check_num_values(int(tensor.shape[-1]))


def _check_num_values(num_values: int) -> None:
    if not (type(num_values) is int and 1 <= num_values <= MAX_NUM_VALUES):
        raise ConfigError(f"num_values must be 1 to {MAX_NUM_VALUES}, got {num_values!r}")


# ---------------------------------------------------------------------------------------------
# Bytes


def encode_packet(packet: Packet) -> bytes:
    """One row's bytes: header, then index section, scales (float32), values, all little-endian.

    Raises:
        ConfigError: a packet of several rows (encode ``packet.row(i)``).
    """
    if packet.values.ndim != 1:
        raise ConfigError("encode one row at a time: packet.row(i)")
    spec, num_values, kept = packet.spec, packet.num_values, packet.num_kept
    layout = index_layout(spec, num_values)
    chunk = spec.chunk if spec.values == "int8" else 0
    parts = [
        HEADER.pack(FORMAT_VERSION, VALUES.index(spec.values), layout, 0, num_values, kept, chunk)
    ]
    if packet.indices is not None:
        indices = packet.indices.cpu().numpy()
        if layout == BITMAP:
            mask = np.zeros(num_values, dtype=bool)
            mask[indices] = True
            parts.append(np.packbits(mask, bitorder="little").tobytes())
        else:
            parts.append(indices.astype("<u4").tobytes())
    if packet.scales is not None:
        parts.append(packet.scales.cpu().numpy().astype("<f4").tobytes())
    values = packet.values.cpu()
    if spec.values == "bf16":
        values = values.view(torch.int16)
    parts.append(values.numpy().astype(_WIRE[spec.values]).tobytes())
    return b"".join(parts)


def decode_packet(
    data: bytes | bytearray | memoryview,
    *,
    spec: Compression,
    num_values: int,
    max_bytes: int,
) -> Packet:
    """Check and read one row's bytes, sent by a peer under the session's ``spec`` and P.

    Sizes first, from the header and ``packet_bytes`` alone, so nothing larger than ``data``
    and the caller's own P is ever allocated: ``len(data) <= max_bytes``; version, encoding,
    layout, P, K (``num_kept``), chunk equal to what ``spec`` and ``num_values`` imply; the exact
    length. Then each section: indices strictly increasing and below P (a bitmap: popcount K, no
    bit at or past P); scales finite, >= 0 and small enough to decode finite; int8 values in
    [-127, 127]; float values finite.

    Raises:
        MessageError: reason ``oversized``, ``bad_compressed`` or ``non_finite``.
        ConfigError: ``num_values`` out of range (the caller's own setting).
    """
    _check_num_values(num_values)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _reject("bad_compressed", f"packet is {type(data).__name__}, not bytes")
    view = memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise _reject("oversized", f"packet of {len(view)} bytes exceeds {max_bytes}")
    if len(view) < HEADER.size:
        raise _reject("bad_compressed", f"packet of {len(view)} bytes is shorter than its header")
    version, code, layout, reserved, count, kept, chunk = HEADER.unpack_from(view, 0)
    expected_kept = num_kept(spec, num_values)
    expected = (
        FORMAT_VERSION,
        VALUES.index(spec.values),
        index_layout(spec, num_values),
        0,
        num_values,
        expected_kept,
        spec.chunk if spec.values == "int8" else 0,
    )
    got = (version, code, layout, reserved, count, kept, chunk)
    if got != expected:
        names = ("version", "values", "layout", "reserved", "num_values", "kept", "chunk")
        wrong = next(i for i in range(len(names)) if got[i] != expected[i])
        raise _reject(
            "bad_compressed", f"header {names[wrong]} is {got[wrong]}, expected {expected[wrong]}"
        )
    size = packet_bytes(spec, num_values)
    if len(view) != size:
        raise _reject("bad_compressed", f"packet has {len(view)} bytes, expected {size}")
    offset = HEADER.size
    indices = None
    if layout == BITMAP:
        width = -(-num_values // 8)
        indices = _bitmap_indices(view[offset : offset + width], num_values, kept)
        offset += width
    elif layout == INDICES:
        indices = _sorted_indices(view[offset : offset + 4 * kept], num_values)
        offset += 4 * kept
    scales = None
    if spec.values == "int8":
        blocks = num_scales(spec, kept)
        scales = _scales(view[offset : offset + 4 * blocks])
        offset += 4 * blocks
    values = _values(view[offset:], spec.values)
    return Packet(spec, num_values, values, indices, scales)


def _reject(reason: str, text: str) -> MessageError:
    return MessageError(f"{reason}: {text}", reason=reason)


def _read(section: memoryview, wire_dtype: str) -> np.ndarray[Any, Any]:
    """A private, aligned, writable, native-order copy of a section."""
    return np.frombuffer(section, dtype=wire_dtype).astype(np.dtype(wire_dtype).newbyteorder("="))


def _bitmap_indices(section: memoryview, num_values: int, kept: int) -> Tensor:
    bits = np.unpackbits(np.frombuffer(section, dtype=np.uint8), bitorder="little")
    if bits[num_values:].any():
        raise _reject("bad_compressed", "bitmap has bits past the last value")
    indices = np.flatnonzero(bits)
    if len(indices) != kept:
        raise _reject("bad_compressed", f"bitmap marks {len(indices)} values, expected {kept}")
    return torch.from_numpy(indices.astype(np.int64))


def _sorted_indices(section: memoryview, num_values: int) -> Tensor:
    indices = _read(section, "<u4").astype(np.int64)
    if len(indices) and (indices[-1] >= num_values or (np.diff(indices) <= 0).any()):
        raise _reject("bad_compressed", "indices are not strictly increasing below num_values")
    return torch.from_numpy(indices)


def _scales(section: memoryview) -> Tensor:
    scales = _read(section, "<f4")
    with np.errstate(invalid="ignore"):
        if not bool(np.isfinite(scales).all()):
            raise _reject("non_finite", "int8 scales hold NaN or infinite values")
        if bool(((scales < 0) | (scales > _MAX_SCALE)).any()):
            raise _reject("bad_compressed", "int8 scales are negative or too large")
    return torch.from_numpy(scales)


def _values(section: memoryview, encoding: str) -> Tensor:
    raw = _read(section, _WIRE[encoding])
    if encoding == "int8":
        if bool((raw < -INT8_MAX).any()):
            raise _reject("bad_compressed", "int8 values hold -128")
        return torch.from_numpy(raw)
    if encoding == "bf16":
        finite = bool(((raw & 0x7F80) != 0x7F80).all())  # exponent all ones: inf or NaN
        values = torch.from_numpy(raw).view(torch.bfloat16)
    else:
        finite = bool(np.isfinite(raw).all())
        values = torch.from_numpy(raw)
    if not finite:
        raise _reject("non_finite", f"{encoding} values hold NaN or infinite values")
    return values


# ---------------------------------------------------------------------------------------------
# Error feedback


class PublicCopy:
    """A public copy ``hat`` of a sender's parameters that sender and receivers keep identical.

    The sender calls :meth:`update` each round and sends the packet; each receiver that holds
    the same ``hat`` (it starts at the initial state all know) calls :meth:`apply` with it. Both
    then run ``hat + decompress(packet)`` on the same numbers, so their copies stay bit-identical
    as long as the receiver applies every packet, in order. With ``spec.is_none`` the packet is
    ``x`` itself and ``hat`` becomes ``x``.

    Args:
        initial: ``(P,)`` or ``(N, P)`` float32, finite; copied.

    Raises:
        StateError: ``initial`` is not such a tensor.
    """

    def __init__(self, initial: Tensor) -> None:
        self._hat = _checked_hat(initial, None)

    @property
    def hat(self) -> Tensor:
        """The public copy, float32 (..., P); read it, do not change it in place."""
        return self._hat

    def update(
        self,
        x: Tensor,
        spec: Compression,
        generator: torch.Generator | Sequence[torch.Generator],
    ) -> Packet:
        """Compress ``x - hat``, apply it to ``hat`` and return the packet to send.

        Raises:
            ConfigError: ``x`` of another shape than ``hat``, or not finite.
        """
        if not isinstance(x, Tensor) or x.shape != self._hat.shape:
            raise ConfigError(f"x must have the public copy's shape {tuple(self._hat.shape)}")
        target = x if spec.is_none else x - self._hat
        packet = compress(target, spec, generator=generator)
        self.apply(packet)
        return packet

    def apply(self, packet: Packet) -> None:
        """Apply a sender's packet (decoded and checked) to this copy of its ``hat``.

        Raises:
            ConfigError: a packet of another shape.
            MessageError: reason ``non_finite`` when the result would overflow; ``hat`` is
                left unchanged.
        """
        if packet.num_values != self._hat.shape[-1] or (
            packet.values.shape[:-1] != self._hat.shape[:-1]
        ):
            raise ConfigError(
                f"packet does not fit a public copy of shape {tuple(self._hat.shape)}"
            )
        if packet.spec.is_none:
            updated = packet.values.to(self._hat.device, torch.float32, copy=True)
        else:
            updated = self._hat + decompress(packet, packet.num_values).to(self._hat.device)
        if not _all_finite(updated):
            raise _reject("non_finite", "the update overflows the public copy")
        self._hat = updated

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only, for a checkpoint: ``{"hat": ...}`` (a copy)."""
        return {"hat": self._hat.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from :meth:`state_dict`; ``hat`` must keep its shape.

        Raises:
            StateError: other keys, another shape or dtype, or non-finite values.
        """
        if not isinstance(state, dict) or set(state) != {"hat"}:
            raise StateError("a public copy's state holds exactly one tensor, 'hat'")
        self._hat = _checked_hat(state["hat"], self._hat)


def _checked_hat(tensor: Tensor, like: Tensor | None) -> Tensor:
    try:
        _check_vector(tensor, "a public copy")
    except ConfigError as exc:
        raise StateError(str(exc)) from None
    if like is not None and tensor.shape != like.shape:
        raise StateError(
            f"public copy of shape {tuple(tensor.shape)}, expected {tuple(like.shape)}"
        )
    if not _all_finite(tensor):
        raise StateError("a public copy holds NaN or infinite values")
    return tensor.detach().to(torch.float32, copy=True).contiguous()
