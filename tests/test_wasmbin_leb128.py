"""LEB128 and the bounded cursor: edge values, padded encodings, and what the spec refuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.wasmbin.reader import Reader, WasmFormatError, encode_name, encode_signed, encode_unsigned

READS = {"u32": Reader.u32, "u64": Reader.u64, "s32": Reader.s32, "s33": Reader.s33, "s64": Reader.s64}


def read(kind: str, raw: bytes) -> int:
    r = Reader(raw)
    value = READS[kind](r)
    r.expect_end("test value")
    return value


@pytest.mark.parametrize(
    ("kind", "raw", "value"),
    [
        ("u32", b"\x00", 0),
        ("u32", b"\x7f", 127),
        ("u32", b"\x80\x01", 128),
        ("u32", b"\xff\xff\xff\xff\x0f", 2**32 - 1),
        ("u64", b"\xff" * 9 + b"\x01", 2**64 - 1),
        ("s32", b"\x7f", -1),
        ("s32", b"\x3f", 63),
        ("s32", b"\xc0\x00", 64),
        ("s32", b"\x40", -64),
        ("s32", b"\xbf\x7f", -65),
        ("s32", b"\xff\xff\xff\xff\x07", 2**31 - 1),
        ("s32", b"\x80\x80\x80\x80\x78", -(2**31)),
        ("s33", b"\x80\x80\x80\x80\x0f", 0xF << 28),
        ("s33", b"\x80\x80\x80\x80\x70", -(2**32)),
        ("s64", b"\xff" * 9 + b"\x00", 2**63 - 1),
        ("s64", b"\x80" * 9 + b"\x7f", -(2**63)),
    ],
)
def test_edge_values_decode(kind, raw, value):
    assert read(kind, raw) == value


@pytest.mark.parametrize(
    ("kind", "raw", "value"),
    [
        ("u32", b"\x80\x80\x80\x80\x00", 0),  # padded to the full width: valid, linkers emit it
        ("u32", b"\x81\x80\x00", 1),
        ("s32", b"\xff\xff\xff\xff\x7f", -1),
        ("s32", b"\x80\x80\x80\x80\x00", 0),
        ("u64", b"\x80" * 9 + b"\x00", 0),
        ("s64", b"\xff" * 9 + b"\x7f", -1),
    ],
)
def test_overlong_encodings_within_the_width_are_accepted(kind, raw, value):
    assert read(kind, raw) == value


@pytest.mark.parametrize(
    ("kind", "raw", "message"),
    [
        ("u32", b"\x80\x80\x80\x80\x80\x00", "longer than 5 bytes"),
        ("u64", b"\x80" * 10 + b"\x00", "longer than 10 bytes"),
        ("s32", b"\x80" * 5 + b"\x00", "longer than 5 bytes"),
        ("u32", b"\xff\xff\xff\xff\x1f", "out of range"),  # 2**33 - 1
        ("u32", b"\x80\x80\x80\x80\x10", "out of range"),
        ("s32", b"\xff\xff\xff\xff\x0f", "out of range"),  # 2**32 - 1 is not an s32
        ("s32", b"\x80\x80\x80\x80\x70", "out of range"),  # sign bits disagree
        ("s32", b"\xff\xff\xff\xff\x77", "out of range"),
        ("s33", b"\x80\x80\x80\x80\x10", "out of range"),
        ("u64", b"\xff" * 9 + b"\x02", "out of range"),
        ("s64", b"\xff" * 9 + b"\x01", "out of range"),
        ("s64", b"\x80" * 9 + b"\x7e", "out of range"),
        ("u32", b"\x80", "unexpected end"),
        ("u32", b"", "unexpected end"),
        ("s64", b"\xff\xff", "unexpected end"),
    ],
)
def test_oversized_overlong_and_truncated_encodings_are_refused(kind, raw, message):
    with pytest.raises(WasmFormatError, match=message):
        read(kind, raw)


def test_errors_carry_the_absolute_offset():
    data = b"abcdefgh" + b"\x80\x80"
    with pytest.raises(WasmFormatError) as info:
        Reader(data, 8).u32()
    assert info.value.offset == 10
    assert "at byte 10" in str(info.value)


def test_a_reader_never_reads_past_its_window():
    r = Reader(b"\x05\x01\x02\x03\x04\x05\x06", 0, 3)
    with pytest.raises(WasmFormatError, match="5 bytes announced, 2 available"):
        r.take(r.u32())


def test_counts_larger_than_the_remaining_bytes_are_refused_before_allocating():
    with pytest.raises(WasmFormatError, match="count 4294967295 exceeds"):
        Reader(b"\xff\xff\xff\xff\x0f\x00").count("import")


def test_names_must_be_utf8():
    assert Reader(encode_name("héllo")).name() == "héllo"
    with pytest.raises(WasmFormatError, match="not valid UTF-8"):
        Reader(b"\x02\xc3\x28").name()


def test_encoders_refuse_values_out_of_range():
    with pytest.raises(ValueError, match="u32"):
        encode_unsigned(2**32)
    with pytest.raises(ValueError, match="s32"):
        encode_signed(2**31)
    with pytest.raises(ValueError, match="u32"):
        encode_unsigned(-1)


def test_padding_to_a_width():
    assert encode_unsigned(1, width=5) == b"\x81\x80\x80\x80\x00"
    assert encode_unsigned(300, width=1) == b"\xac\x02"  # a width that is too small is ignored


@given(st.integers(0, 2**32 - 1), st.integers(1, 5))
def test_u32_round_trips_at_any_width(value, width):
    assert read("u32", encode_unsigned(value, width=width)) == value


@given(st.integers(0, 2**64 - 1))
def test_u64_round_trips(value):
    assert read("u64", encode_unsigned(value, 64)) == value


@given(st.integers(-(2**31), 2**31 - 1))
def test_s32_round_trips(value):
    assert read("s32", encode_signed(value, 32)) == value


@given(st.integers(-(2**63), 2**63 - 1))
def test_s64_round_trips(value):
    assert read("s64", encode_signed(value, 64)) == value


@given(st.sampled_from(sorted(READS)), st.binary(max_size=12))
def test_arbitrary_bytes_decode_or_raise_the_format_error(kind, raw):
    bits = int(kind[1:])
    try:
        value = READS[kind](Reader(raw))
    except WasmFormatError:
        return
    if kind.startswith("u"):
        assert 0 <= value < 2**bits
    else:
        assert -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)
