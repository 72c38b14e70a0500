"""Compressed updates: specs, codecs, the packet format and its strict decoder, public copies.

The fuzz properties follow ``test_fuzz.py``: derandomized, a per-example deadline, and only the
documented error (``MessageError`` with a reason from ``compress.REASONS``) may come out.
"""

from __future__ import annotations

import math
import re
import struct
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtorrent.errors import ConfigError, MessageError, StateError
from fedtorrent.state import compress as cz
from fedtorrent.state.compress import (
    Compression,
    Packet,
    PublicCopy,
    compress,
    decode_packet,
    decompress,
    encode_packet,
    packet_bytes,
)

FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=1),
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
SPECS = [
    "none",
    "fp16",
    "bf16",
    "int8",
    "int8:7",
    "topk:0.1",
    "topk:0.01",
    "topk:0.5,fp16",
    "topk:0.1,bf16",
    "topk:0.05,int8",
    "topk:1.0,int8:3",
]
SIZES = (1, 7, 8, 9, 1000, 7850)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def roundtrip(packet: Packet) -> Packet:
    data = encode_packet(packet)
    return decode_packet(data, spec=packet.spec, num_values=packet.num_values, max_bytes=len(data))


def same_packet(a: Packet, b: Packet) -> bool:
    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return (x is None and y is None) or (
            x is not None and y is not None and x.dtype == y.dtype and torch.equal(x, y)
        )

    return (
        a.spec == b.spec
        and a.num_values == b.num_values
        and same(a.values, b.values)
        and same(a.indices, b.indices)
        and same(a.scales, b.scales)
    )


# -- specs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", SPECS)
def test_spec_parses_and_prints_canonically(text: str) -> None:
    spec = Compression.parse(text)
    assert Compression.parse(str(spec)) == spec
    assert str(Compression.parse(str(spec))) == str(spec)


def test_spec_fields() -> None:
    assert Compression.parse("none").is_none and Compression() == Compression.parse("none")
    assert Compression.parse("topk:0.05,int8") == Compression(topk=0.05, values="int8")
    assert Compression.parse("int8:64") == Compression(values="int8", chunk=64)
    assert str(Compression(topk=0.1, values="fp16")) == "topk:0.1,fp16"
    assert str(Compression(values="int8", chunk=256)) == "int8"
    assert not Compression.parse("topk:1").is_none and not Compression.parse("fp16").is_none


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fp32",
        "FP16",
        "topk",
        "topk:",
        "topk:0",
        "topk:0.0",
        "topk:1.5",
        "topk:-0.1",
        "topk:nan",
        "topk:inf",
        "topk:1_0",
        "topk:0.1,",
        "topk:0.1,fp32",
        "int8,topk:0.1",
        "topk:0.1,int8,fp16",
        "topk:0.1,topk:0.2",
        "fp16,bf16",
        "int8:0",
        "int8:70000",
        "int8:",
        "none,int8",
        "gzip",
    ],
)
def test_bad_specs_are_one_line_config_errors(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Compression.parse(text)
    message = str(caught.value)
    assert "\n" not in message and "topk:F,int8" in message and repr(text) in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"values": "fp8"},
        {"topk": 0.0},
        {"topk": 2.0},
        {"topk": math.nan},
        {"topk": True},
        {"values": "int8", "chunk": 0},
        {"values": "fp16", "chunk": 128},
    ],
)
def test_bad_fields_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Compression(**kwargs)  # type: ignore[arg-type]


@given(
    st.none() | st.floats(min_value=1e-9, max_value=1.0, exclude_min=True),
    st.sampled_from(cz.VALUES),
    st.integers(1, cz.MAX_CHUNK),
)
@FUZZ
def test_spec_str_round_trips(topk: float | None, values: str, chunk: int) -> None:
    spec = Compression(topk=topk, values=values, chunk=chunk if values == "int8" else 256)
    assert Compression.parse(str(spec)) == spec


def test_kept_count_reads_the_fraction_as_written() -> None:
    # 0.1 * 7850 is 785.0000000000001 in binary floating point; the spec means 785.
    assert cz.num_kept(Compression(topk=0.1), 7850) == 785
    assert cz.num_kept(Compression(topk=0.05), 7850) == 393
    assert cz.num_kept(Compression(topk=0.1), 1) == 1
    assert cz.num_kept(Compression(values="int8"), 9) == 9


# -- compress / decompress -----------------------------------------------------------------------


def test_topk_keeps_exactly_the_largest_per_row() -> None:
    delta = torch.randn(5, 1000, generator=gen(1))
    spec = Compression(topk=0.1)
    packet = compress(delta, spec, generator=gen())
    assert packet.indices is not None and packet.indices.shape == (5, 100)
    for row in range(5):
        expected = torch.argsort(delta[row].abs(), descending=True)[:100].sort().values
        assert torch.equal(packet.indices[row], expected)
    dense = decompress(packet, 1000)
    kept = dense != 0
    assert torch.equal(dense[kept], delta[kept]) and kept.sum(dim=1).tolist() == [100] * 5


def test_topk_ties_go_to_the_lowest_indices() -> None:
    delta = torch.tensor([3.0, 1.0, -1.0, 1.0, 2.0, -0.5])
    packet = compress(delta, Compression(topk=0.5), generator=gen())
    assert packet.indices is not None and packet.indices.tolist() == [0, 1, 4]
    flat = compress(torch.zeros(2, 10), Compression(topk=0.3), generator=gen())
    assert flat.indices is not None and flat.indices.tolist() == [[0, 1, 2]] * 2


@pytest.mark.parametrize("text", ["int8:5", "topk:0.3,int8", "topk:0.2,bf16"])
def test_rows_with_their_own_generators_equal_one_row_calls(text: str) -> None:
    spec = Compression.parse(text)
    delta = torch.randn(4, 50, generator=gen(2))
    batched = compress(delta, spec, generator=[gen(10 + i) for i in range(4)])
    for row in range(4):
        alone = compress(delta[row], spec, generator=gen(10 + row))
        assert same_packet(batched.row(row), alone)


def test_int8_is_unbiased_and_within_one_step() -> None:
    chunk = 16
    values = torch.linspace(-1.0, 1.0, chunk)  # scale 1/127: most values fall between steps
    draws = values.repeat(4000, 1)
    packet = compress(draws, Compression(values="int8", chunk=chunk), generator=gen(3))
    decoded = decompress(packet, chunk)
    step = 1.0 / 127
    assert float((decoded - values).abs().max()) < step * (1 + 1e-5)
    # Each draw errs by at most one step, so the mean of 4000 has a standard error <= step/126.
    bias = (decoded.mean(dim=0) - values).abs()
    assert float(bias.max()) < 5 * step / math.sqrt(4000)
    nearest = torch.round(values / step) * step  # deterministic rounding, for contrast
    assert float((nearest - values).abs().max()) > 10 * float(bias.max())


def test_int8_chunks_have_their_own_scales_and_zero_chunks_scale_zero() -> None:
    delta = torch.cat([torch.zeros(4), torch.full((4,), 2.0), torch.tensor([-127.0, 0.0])])
    packet = compress(delta, Compression(values="int8", chunk=4), generator=gen())
    assert packet.scales is not None
    assert packet.scales.tolist() == pytest.approx([0.0, 2.0 / 127, 1.0])
    assert packet.values.tolist()[:4] == [0, 0, 0, 0] and packet.values.tolist()[-2:] == [-127, 0]
    assert torch.allclose(decompress(packet, 10), delta)


@pytest.mark.parametrize(("values", "limit"), [("fp16", 65504.0), ("bf16", 3.3895313892515355e38)])
def test_casts_saturate_instead_of_overflowing(values: str, limit: float) -> None:
    delta = torch.tensor([1e6, -1e6, 7e4, 1.0, 3.4e38, -3.4e38])
    packet = compress(delta, Compression(values=values), generator=gen())
    dense = decompress(packet, 6)
    assert bool(torch.isfinite(dense).all()) and float(dense.abs().max()) == limit
    assert dense[3] == 1.0 and bool((dense[[1, 5]] < 0).all())
    assert same_packet(roundtrip(packet), packet)


def test_compress_refuses_bad_input() -> None:
    spec = Compression(values="int8")
    for bad in (torch.zeros(3, dtype=torch.float64), torch.zeros(2, 2, 2), torch.zeros(0)):
        with pytest.raises(ConfigError):
            compress(bad, spec, generator=gen())
    with pytest.raises(ConfigError, match="NaN"):
        compress(torch.tensor([1.0, math.nan]), spec, generator=gen())
    with pytest.raises(ConfigError, match="generators"):
        compress(torch.zeros(3, 4), spec, generator=[gen(), gen()])


def test_none_packet_is_the_vector_itself() -> None:
    delta = torch.randn(7, generator=gen(4))
    packet = compress(delta, Compression(), generator=gen())
    assert packet.indices is None and packet.scales is None and torch.equal(packet.values, delta)
    assert packet.values.data_ptr() != delta.data_ptr()


# -- bytes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("size", SIZES)
def test_encode_decode_round_trip(text: str, size: int) -> None:
    spec = Compression.parse(text)
    delta = torch.randn(size, generator=gen(size)) * 10
    packet = compress(delta, spec, generator=gen(5))
    data = encode_packet(packet)
    assert len(data) == packet_bytes(spec, size)
    decoded = decode_packet(data, spec=spec, num_values=size, max_bytes=len(data))
    assert same_packet(decoded, packet)
    assert torch.equal(decompress(decoded, size), decompress(packet, size))
    assert encode_packet(decoded) == data


def test_layout_is_the_smaller_of_bitmap_and_indices() -> None:
    assert cz.index_layout(Compression(topk=0.1), 7850) == cz.BITMAP  # 982 B < 3140 B
    assert cz.index_layout(Compression(topk=0.01), 7850) == cz.INDICES  # 316 B < 982 B
    assert cz.index_layout(Compression(values="int8"), 7850) == cz.DENSE
    assert packet_bytes(Compression(topk=0.1, values="int8"), 7850) == 16 + 982 + 4 * 4 + 785


@given(
    st.none() | st.floats(min_value=1e-4, max_value=1.0, exclude_min=True),
    st.sampled_from(cz.VALUES),
    st.integers(1, 300),
    st.integers(1, 5000),
    st.integers(0, 2**32),
)
@FUZZ
def test_packet_bytes_is_the_encoded_length(
    topk: float | None, values: str, chunk: int, size: int, seed: int
) -> None:
    spec = Compression(topk=topk, values=values, chunk=chunk if values == "int8" else 256)
    delta = torch.randn(size, generator=gen(seed)) * float(np.exp(seed % 40 - 20))
    packet = compress(delta, spec, generator=gen(seed))
    assert len(encode_packet(packet)) == packet_bytes(spec, size)


def test_encode_takes_one_row() -> None:
    packet = compress(torch.zeros(2, 4), Compression(), generator=gen())
    with pytest.raises(ConfigError, match="row"):
        encode_packet(packet)
    assert len(encode_packet(packet.row(1))) == packet_bytes(Compression(), 4)


# -- hostile packets -----------------------------------------------------------------------------

INT8_TOPK = Compression(topk=0.3, values="int8", chunk=2)
P = 40  # K = 12: bitmap of 5 bytes beats 48 bytes of indices


def valid(spec: Compression, size: int, seed: int = 0) -> bytes:
    return encode_packet(compress(torch.randn(size, generator=gen(seed)), spec, generator=gen()))


def reason_of(data: bytes, spec: Compression, size: int, max_bytes: int = 1 << 20) -> str:
    with pytest.raises(MessageError) as caught:
        decode_packet(data, spec=spec, num_values=size, max_bytes=max_bytes)
    assert caught.value.reason in cz.REASONS and "\n" not in str(caught.value)
    return caught.value.reason


def patched(data: bytes, offset: int, fmt: str, *values: object) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def test_size_and_header_checks() -> None:
    data = valid(INT8_TOPK, P)
    assert reason_of(data, INT8_TOPK, P, max_bytes=len(data) - 1) == "oversized"
    assert reason_of(data[:15], INT8_TOPK, P) == "bad_compressed"
    assert reason_of(data[:-1], INT8_TOPK, P) == "bad_compressed"
    assert reason_of(data + b"\0", INT8_TOPK, P) == "bad_compressed"
    for field, value in enumerate([2, 0, cz.INDICES, 1]):  # version, values, layout, reserved
        assert reason_of(patched(data, field, "<B", value), INT8_TOPK, P) == "bad_compressed"
    for offset, value in [(4, P + 1), (8, 13), (8, 2**32 - 1), (12, 3), (12, 0)]:  # P, K, chunk
        assert reason_of(patched(data, offset, "<I", value), INT8_TOPK, P) == "bad_compressed"
    assert reason_of(data, Compression(topk=0.3, values="int8"), P) == "bad_compressed"  # chunk
    assert reason_of(data, Compression(topk=0.3, values="fp16"), P) == "bad_compressed"
    with pytest.raises(MessageError, match="not bytes"):
        decode_packet("text", spec=INT8_TOPK, num_values=P, max_bytes=100)  # type: ignore[arg-type]


def test_bitmap_checks() -> None:
    spec, size = Compression(topk=0.3, values="int8", chunk=2), 37  # K = 12, bitmap 5 bytes
    data = valid(spec, size)
    assert cz.index_layout(spec, size) == cz.BITMAP
    bitmap = bytearray(data[16:21])
    first_set = next(i for i in range(size) if bitmap[i // 8] >> (i % 8) & 1)
    fewer = bytearray(bitmap)
    fewer[first_set // 8] &= ~(1 << (first_set % 8))
    more = bytearray(bitmap)
    more[next(i for i in range(size) if not bitmap[i // 8] >> (i % 8) & 1) // 8] = 0xFF
    moved = bytearray(fewer)
    moved[4] |= 0x80  # bit 39: popcount K again, but past P = 37
    for wrong in (fewer, more, moved):
        assert reason_of(data[:16] + bytes(wrong) + data[21:], spec, size) == "bad_compressed"
    with pytest.raises(MessageError, match="past"):
        decode_packet(
            data[:16] + bytes(moved) + data[21:], spec=spec, num_values=size, max_bytes=99
        )


def test_index_checks() -> None:
    spec, size = Compression(topk=0.01), 2000  # K = 20: 80 bytes of indices < 250 of bitmap
    assert cz.index_layout(spec, size) == cz.INDICES
    data = valid(spec, size)
    indices = struct.unpack_from("<20I", data, 16)
    assert reason_of(patched(data, 16 + 4 * 19, "<I", size), spec, size) == "bad_compressed"
    assert reason_of(patched(data, 16 + 4 * 19, "<I", 2**32 - 1), spec, size) == "bad_compressed"
    assert reason_of(patched(data, 16 + 4, "<I", indices[0]), spec, size) == "bad_compressed"
    swapped = patched(data, 16, "<2I", indices[1], indices[0])
    assert reason_of(swapped, spec, size) == "bad_compressed"


def test_scale_and_value_checks() -> None:
    data = valid(INT8_TOPK, P)
    scales = 16 + 5  # after the 5-byte bitmap; K = 12 values in 6 chunks of 2
    for bad in (math.nan, math.inf, -1.0, 3e38):
        reason = reason_of(patched(data, scales + 4, "<f", bad), INT8_TOPK, P)
        assert reason == ("non_finite" if not math.isfinite(bad) else "bad_compressed")
    assert reason_of(patched(data, len(data) - 1, "<b", -128), INT8_TOPK, P) == "bad_compressed"
    for text, fmt, bad_bits in [
        ("fp16", "<H", 0x7C00),
        ("bf16", "<H", 0x7FC0),
        ("none", "<I", 0x7FC00000),
    ]:
        spec = Compression.parse(text)
        plain = valid(spec, 9)
        assert reason_of(
            patched(plain, len(plain) - struct.calcsize(fmt), fmt, bad_bits), spec, 9
        ) == ("non_finite")


def test_a_huge_declared_size_fails_fast_without_allocating() -> None:
    size = 2**31
    spec = Compression(values="int8")
    header = cz.HEADER.pack(1, 3, cz.DENSE, 0, size, size, 256)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        # The receiver's own model is this large and the header agrees: only the length is off.
        assert reason_of(header + bytes(64), spec, size, max_bytes=1 << 40) == "bad_compressed"
        # A header declaring 2**31 values to a receiver expecting 1000.
        assert reason_of(header + bytes(64), spec, 1000) == "bad_compressed"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 0.5 and peak < 1 << 20


def decodes_or_rejects(data: bytes, spec: Compression, size: int) -> None:
    """Only a MessageError with a documented reason; whatever decodes is canonical and finite.

    Python-side allocations (numpy reports to tracemalloc) stay within a small multiple of the
    packet: the decoder never sizes anything from a declared count.
    """
    tracemalloc.start()
    try:
        try:
            packet = decode_packet(data, spec=spec, num_values=size, max_bytes=4096)
        except MessageError as exc:
            assert exc.reason in cz.REASONS
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(data) + (64 << 10)
    assert encode_packet(packet) == data
    assert bool(torch.isfinite(decompress(packet, size)).all())


FUZZ_SPECS = st.sampled_from([Compression.parse(text) for text in SPECS])


@FUZZ
@given(FUZZ_SPECS, st.integers(1, 300), st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(spec: Compression, size: int, data: bytes) -> None:
    decodes_or_rejects(data, spec, size)


@FUZZ
@given(FUZZ_SPECS, st.integers(1, 300), st.binary(max_size=600))
def test_fuzz_a_valid_header_then_arbitrary_bytes(
    spec: Compression, size: int, body: bytes
) -> None:
    decodes_or_rejects(valid(spec, size)[:16] + body, spec, size)


@FUZZ
@given(FUZZ_SPECS, st.integers(1, 300), st.data())
def test_fuzz_mutated_packets(spec: Compression, size: int, data: st.DataObject) -> None:
    packet = bytearray(valid(spec, size, seed=size))
    for _ in range(data.draw(st.integers(1, 6))):
        packet[data.draw(st.integers(0, len(packet) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(packet)))
    decodes_or_rejects(bytes(packet[:cut]) + data.draw(st.binary(max_size=8)), spec, size)


@FUZZ
@given(
    FUZZ_SPECS,
    st.integers(1, 300),
    st.tuples(*[st.integers(0, 255)] * 4, *[st.sampled_from([0, 1, 7, 2**31, 2**32 - 1])] * 3),
)
def test_fuzz_headers_declaring_anything(
    spec: Compression, size: int, fields: tuple[int, ...]
) -> None:
    body = valid(spec, size)[16:]
    decodes_or_rejects(cz.HEADER.pack(*fields) + body, spec, size)


# -- public copies -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["topk:0.1,int8", "int8", "topk:0.05,bf16", "none"])
def test_sender_and_receiver_copies_stay_identical(text: str) -> None:
    spec = Compression.parse(text)
    initial = torch.randn(300, generator=gen(6))
    sender, receiver = PublicCopy(initial), PublicCopy(initial)
    x = initial.clone()
    for round_index in range(30):
        x += 0.1 * torch.randn(300, generator=gen(100 + round_index))
        packet = sender.update(x, spec, gen(round_index))
        receiver.apply(roundtrip(packet))
        assert torch.equal(sender.hat, receiver.hat)
    if spec.is_none:
        assert torch.equal(sender.hat, x)


def test_error_feedback_reaches_x_where_naive_topk_does_not() -> None:
    spec = Compression.parse("topk:0.1,int8")
    x = torch.randn(1000, generator=gen(7))
    copy = PublicCopy(torch.zeros(1000))
    for round_index in range(100):
        copy.update(x, spec, gen(round_index))
    assert float((x - copy.hat).abs().max()) < 1e-5
    naive = decompress(compress(x, spec, generator=gen()), 1000)  # top-k of x itself
    assert float((x - naive).norm() / x.norm()) > 0.5
    assert int((naive == 0).sum()) == 900


def test_public_copy_batched_rows_match_single_rows() -> None:
    spec = Compression.parse("topk:0.2,int8:16")
    initial = torch.randn(3, 64, generator=gen(8))
    batched = PublicCopy(initial)
    singles = [PublicCopy(initial[i]) for i in range(3)]
    for round_index in range(5):
        x = initial + torch.randn(3, 64, generator=gen(200 + round_index))
        batched.update(x, spec, [gen(10 * round_index + i) for i in range(3)])
        for i, single in enumerate(singles):
            single.update(x[i], spec, gen(10 * round_index + i))
    assert torch.equal(batched.hat, torch.stack([s.hat for s in singles]))


def test_public_copy_checkpoint_resumes_identically() -> None:
    spec = Compression.parse("topk:0.1,int8")
    x = torch.randn(200, generator=gen(9))
    first = PublicCopy(torch.zeros(200))
    first.update(x, spec, gen(1))
    resumed = PublicCopy(torch.zeros(200))
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(first.update(x, spec, gen(2)).values, resumed.update(x, spec, gen(2)).values)
    assert torch.equal(first.hat, resumed.hat)
    for bad in (
        {"hat": torch.zeros(201)},
        {"hat": torch.zeros(200), "extra": torch.zeros(1)},
        {"hat": torch.full((200,), math.nan)},
        {"hat": torch.zeros(200, dtype=torch.float64)},
    ):
        with pytest.raises(StateError):
            resumed.load_state_dict(bad)
    assert torch.equal(first.hat, resumed.hat)


def test_an_overflowing_packet_leaves_the_copy_unchanged() -> None:
    copy = PublicCopy(torch.zeros(4))
    huge = Packet(Compression(topk=0.5), 4, torch.full((2,), 3e38), torch.tensor([0, 1]))
    copy.apply(huge)
    before = copy.hat.clone()
    with pytest.raises(MessageError) as caught:
        copy.apply(huge)
    assert caught.value.reason == "non_finite" and torch.equal(copy.hat, before)
    with pytest.raises(ConfigError):
        copy.apply(compress(torch.zeros(5), Compression(), generator=gen()))


def test_the_size_table_in_the_docs_is_what_packet_bytes_gives() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "wire.md").read_text()
    rows = re.findall(r"^\| (`[^|]+`) +\|((?: *\d+ B \([\d.]+\) *\|){3})$", page, re.M)
    assert len(rows) == 8
    for names, cells in rows:
        for text in re.findall(r"`([^`]+)`", names):
            spec = Compression.parse(text)
            for size, (count, ratio) in zip(
                (7850, 101770, 215370), re.findall(r"(\d+) B \(([\d.]+)\)", cells), strict=True
            ):
                assert packet_bytes(spec, size) == int(count)
                assert f"{packet_bytes(spec, size) / (4 * size):.4f}" == ratio
