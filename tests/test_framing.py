"""The line framer: lines out of arbitrary chunks, oversized lines refused without losing sync."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.framing import LineFramer, OversizedLine


def feed_all(framer: LineFramer, chunks: list[bytes]) -> list[bytes | OversizedLine]:
    out: list[bytes | OversizedLine] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    return out


def test_lines_split_across_chunks_are_joined() -> None:
    framer = LineFramer(100)
    assert feed_all(framer, [b'{"a":', b"1}\n{", b'"b":2}\n']) == [b'{"a":1}', b'{"b":2}']


def test_crlf_and_blank_lines() -> None:
    framer = LineFramer(100)
    assert framer.feed(b"one\r\n\n  \ntwo\n") == [b"one", b"two"]


def test_incomplete_line_waits_for_its_newline() -> None:
    framer = LineFramer(100)
    assert framer.feed(b"partial") == []
    assert framer.buffered == 7
    assert framer.feed(b"\n") == [b"partial"]


def test_oversized_line_in_one_chunk_is_refused_and_next_line_served() -> None:
    framer = LineFramer(10)
    out = framer.feed(b"x" * 11 + b"\nok\n")
    assert out == [OversizedLine(seen=11, bound=10), b"ok"]


def test_oversized_line_is_never_buffered_whole() -> None:
    framer = LineFramer(10)
    out = framer.feed(b"x" * 8)
    out += framer.feed(b"x" * 8)  # passes the bound: refused now, not at the newline
    assert out == [OversizedLine(seen=16, bound=10)]
    for _ in range(1000):
        assert framer.feed(b"y" * 1000) == []
        assert framer.buffered == 0
    assert framer.feed(b"tail\nnext\n") == [b"next"]


def test_line_exactly_at_the_bound_is_accepted() -> None:
    framer = LineFramer(5)
    assert framer.feed(b"12345\n123456\n") == [b"12345", OversizedLine(seen=6, bound=5)]


@given(
    st.lists(st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b and b.strip()), max_size=20),
    st.lists(st.integers(min_value=1, max_value=17), min_size=1, max_size=10),
)
def test_any_chunking_gives_the_same_lines(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    chunks, position, index = [], 0, 0
    while position < len(stream):
        size = cuts[index % len(cuts)]
        chunks.append(stream[position : position + size])
        position += size
        index += 1
    expected = [line.rstrip(b"\r") for line in lines]
    expected = [line if len(line) <= 20 else OversizedLine(len(line), 20) for line in expected]
    got = feed_all(LineFramer(20), chunks)
    assert [g if isinstance(g, bytes) else "big" for g in got] == [
        e if isinstance(e, bytes) else "big" for e in expected if not isinstance(e, bytes) or e.strip()
    ]


@pytest.mark.parametrize("cut", [1, 2])  # the newline alone, or the `\r` and the newline, arrive later
def test_a_line_of_exactly_the_bound_ended_by_crlf_fits_however_it_is_split(cut: int) -> None:
    framer = LineFramer(8)
    data = b"12345678\r\n"
    assert framer.feed(data[: len(data) - cut]) == []
    assert framer.feed(data[len(data) - cut :]) == [b"12345678"]
    assert framer.feed(b"123456789\r") == [OversizedLine(seen=10, bound=8)]  # one byte more is over


def test_a_chunk_of_many_lines_keeps_their_order_blanks_skipped_and_bound_checked() -> None:
    framer = LineFramer(5)
    assert framer.feed(b"a\n  \n\nbc\nde") == [b"a", b"bc"]  # whole lines, one pending
    assert framer.feed(b"f\n123456\ng\n") == [b"def", OversizedLine(seen=6, bound=5), b"g"]
    assert framer.feed(b"h\ni\n123456") == [b"h", b"i", OversizedLine(seen=6, bound=5)]  # an oversized tail
    assert framer.feed(b"7\nj\n") == [b"j"]
