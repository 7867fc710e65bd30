"""The instruction stream: every opcode's immediates, function-body scanning, constant expressions.

Owns the opcode table (core, sign-extension, saturating truncation, bulk memory, reference types,
tail calls, exceptions, typed function references, GC, SIMD and relaxed SIMD, threads, wide
arithmetic, multi-memory memargs) and walking a body instruction by instruction so that the
operations that matter for snapshots are found at real instruction boundaries, never inside an
immediate. Proposals wasmtime 50 leaves off by default (stack switching, custom descriptors,
memory control, shared-everything threads) are unknown opcodes here. Knows nothing about
sections or indices beyond the body it is given, and does not validate: block nesting and
typing are wasmtime's job.

A per-instruction Python loop takes 2.5 s over CPython's 5 MB of code, so runs of uninteresting
instructions are skipped by one regular expression generated from the same table (12x faster);
whatever it declines (notable, rare or irregular instructions, unusual encodings) goes through
the exact decoder.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable

from .reader import Reader, WasmFormatError
from .valtypes import ABSTRACT_HEAP, NUMERIC, read_heaptype, read_valtype, skip_blocktype

# How to read (and skip) an instruction's immediates; None when it has none.
Immediates = Callable[[Reader], None] | None


def _idx(r: Reader) -> None:
    r.u32()


def _idx2(r: Reader) -> None:
    r.u32()
    r.u32()


def _memarg(r: Reader) -> None:
    if r.u32() & 0x40:  # multi-memory: an explicit memory index follows the alignment
        r.u32()
    r.u64()


def _s32(r: Reader) -> None:
    r.s32()


def _s64(r: Reader) -> None:
    r.s64()


def _f32(r: Reader) -> None:
    r.take(4)


def _f64(r: Reader) -> None:
    r.take(8)


def _bytes16(r: Reader) -> None:
    r.take(16)


def _lane(r: Reader) -> None:
    r.u8()


def _memarg_lane(r: Reader) -> None:
    _memarg(r)
    r.u8()


def _br_table(r: Reader) -> None:
    for _ in range(r.count("br_table label")):
        r.u32()
    r.u32()


def _select_t(r: Reader) -> None:
    for _ in range(r.count("select type")):
        read_valtype(r)


def _heap(r: Reader) -> None:
    read_heaptype(r)


def _try_table(r: Reader) -> None:
    skip_blocktype(r)
    for _ in range(r.count("catch clause")):
        start = r.pos
        kind = r.u8()
        if kind > 3:
            raise WasmFormatError(f"unknown catch clause kind {kind}", start)
        if kind < 2:  # catch / catch_ref name a tag before the label
            r.u32()
        r.u32()


def _fence(r: Reader) -> None:
    start = r.pos
    if r.u8() != 0:
        raise WasmFormatError("atomic.fence flags must be zero", start)


def _br_on_cast(r: Reader) -> None:
    start = r.pos
    if r.u8() > 3:
        raise WasmFormatError("unknown br_on_cast flags", start)
    r.u32()
    read_heaptype(r)
    read_heaptype(r)


def _table(*groups: tuple[Immediates, Iterable[int]]) -> dict[int, Immediates]:
    return {op: kind for kind, ops in groups for op in ops}


_SINGLE = _table(
    (None, (0x00, 0x01, 0x05, 0x0A, 0x0B, 0x0F, 0x19, 0x1A, 0x1B, 0xD1, 0xD3, 0xD4)),
    (None, range(0x45, 0xC5)),  # numeric operators and sign extension
    (_idx, (0x07, 0x08, 0x09, 0x0C, 0x0D, 0x10, 0x12, 0x14, 0x15, 0x18, 0x25, 0x26)),
    (_idx, (0x3F, 0x40, 0xD2, 0xD5, 0xD6)),
    (_idx, range(0x20, 0x25)),  # local.get/set/tee, global.get/set
    (_idx2, (0x11, 0x13)),
    (skip_blocktype, (0x02, 0x03, 0x04, 0x06)),
    (_br_table, (0x0E,)),
    (_select_t, (0x1C,)),
    (_try_table, (0x1F,)),
    (_memarg, range(0x28, 0x3F)),
    (_s32, (0x41,)),
    (_s64, (0x42,)),
    (_f32, (0x43,)),
    (_f64, (0x44,)),
    (_heap, (0xD0,)),
)

_SIMD_GAPS = (0x9A, 0xA2, 0xA5, 0xA6, 0xAF, 0xB0, 0xB2, 0xB3, 0xB4, 0xBB, 0xC2, 0xC5, 0xC6, 0xCF)
_SIMD_GAPS += (0xD0, 0xD2, 0xD3, 0xD4, 0xE2, 0xEE)

_PREFIXED: dict[int, dict[int, Immediates]] = {
    0xFB: _table(  # GC
        (_idx, (0, 1, 6, 7, 11, 12, 13, 14, 16)),
        (_idx2, (2, 3, 4, 5, 8, 9, 10, 17, 18, 19)),
        (_heap, range(20, 24)),
        (_br_on_cast, (24, 25)),
        (None, (15, 26, 27, 28, 29, 30)),
    ),
    0xFC: _table(
        (None, range(0, 8)),  # saturating truncation
        (_idx2, (8, 10, 12, 14)),  # memory.init, memory.copy, table.init, table.copy
        (_idx, (9, 11, 13, 15, 16, 17)),
        (None, range(19, 23)),  # wide arithmetic
    ),
    0xFD: _table(
        (_memarg, (*range(0, 12), 0x5C, 0x5D)),
        (_bytes16, (0x0C, 0x0D)),  # v128.const, i8x16.shuffle
        (_lane, range(0x15, 0x23)),
        (_memarg_lane, range(0x54, 0x5C)),
        (None, (*range(0x0E, 0x15), *range(0x23, 0x54))),
        (None, (op for op in range(0x5E, 0x100) if op not in _SIMD_GAPS)),
        (None, range(0x100, 0x114)),  # relaxed SIMD
    ),
    0xFE: _table(  # threads
        (_memarg, (0, 1, 2, *range(0x10, 0x4F))),
        (_fence, (3,)),
    ),
}

END = 0x0B
_STRUCTURED = frozenset((0x02, 0x03, 0x04, 0x06, 0x1F))


def _key(prefix: int, sub: int) -> int:
    return prefix << 32 | sub


# What a snapshot cares about, keyed like `_step` returns.
NOTABLE = {
    0x26: "table.set",
    0x40: "memory.grow",
    _key(0xFC, 9): "data.drop",
    _key(0xFC, 12): "table.init",
    _key(0xFC, 13): "elem.drop",
    _key(0xFC, 14): "table.copy",
    _key(0xFC, 15): "table.grow",
    _key(0xFC, 17): "table.fill",
}


def _step(r: Reader) -> int:
    """Decode one instruction; returns its opcode, or `prefix << 32 | subopcode`."""
    start = r.pos
    op = r.u8()
    table = _PREFIXED.get(op)
    if table is None:
        if op not in _SINGLE:
            raise WasmFormatError(f"unknown opcode 0x{op:02x}", start)
        immediates = _SINGLE[op]
        key = op
    else:
        sub = r.u32()
        if sub not in table:
            raise WasmFormatError(f"unknown opcode 0x{op:02x} {sub}", start)
        immediates = table[sub]
        key = _key(op, sub)
    if immediates is not None:
        immediates(r)
    return key


def read_const_expr(r: Reader) -> bytes:
    """The raw bytes of a constant expression, through its `end`."""
    start = r.pos
    while True:
        if r.peek() in _STRUCTURED:
            raise WasmFormatError("block instruction in a constant expression", r.pos)
        if _step(r) == END:
            return r.data[start : r.pos]


def scan_function(body: Reader) -> frozenset[str]:
    """The `NOTABLE` operations a function body (locals, then its expression) contains."""
    for _ in range(body.count("local group")):
        body.u32()
        read_valtype(body)
    data, pos, end = body.data, body.pos, body.end
    if pos >= end or data[end - 1] != END:
        raise WasmFormatError("function body does not end with `end`", end - 1)
    found: set[str] = set()
    skip = _fast_pattern().match
    while True:
        pos = skip(data, pos, end).end()  # type: ignore[union-attr]  # the pattern matches even b""
        if pos >= end:
            return frozenset(found)
        body.pos = pos
        name = NOTABLE.get(_step(body))
        if name is not None:
            found.add(name)
        pos = body.pos


# --- the fast path: a regex accepting exactly the encodings `_step` accepts, minus NOTABLE ---

_U32 = rb"(?:[\x80-\xff]{0,3}[\x00-\x7f]|[\x80-\xff]{4}[\x00-\x0f])"
_U64 = rb"(?:[\x80-\xff]{0,8}[\x00-\x7f]|[\x80-\xff]{9}[\x00\x01])"
_S32 = rb"(?:[\x80-\xff]{0,3}[\x00-\x7f]|[\x80-\xff]{4}[\x00-\x07\x78-\x7f])"
_S64 = rb"(?:[\x80-\xff]{0,8}[\x00-\x7f]|[\x80-\xff]{9}[\x00\x7f])"
_INDEX_S33 = rb"(?:[\x80-\xff]{0,3}[\x00-\x3f]|[\x80-\xff]{4}[\x00-\x0f])"  # non-negative


def _literal(raw: bytes) -> bytes:
    return b"".join(b"\\x%02x" % byte for byte in raw)


def _class(codes: Iterable[int]) -> bytes:
    return b"[" + _literal(bytes(codes)) + b"]"


_HEAPTYPE = b"(?:" + _class(ABSTRACT_HEAP) + b"|" + _INDEX_S33 + b")"
_BLOCKTYPE = b"(?:" + _class([0x40, *NUMERIC, *ABSTRACT_HEAP])  # empty, or a one-byte value type
_BLOCKTYPE += b"|[\\x63\\x64]" + _HEAPTYPE + b"|" + _INDEX_S33 + b")"
_MEMARG = b"(?:[\\x00-\\x3f]|[\\x40-\\x7f]" + _U32 + b")" + _U64
_FAST_TAILS: dict[Immediates, bytes] = {
    None: b"",
    _idx: _U32,
    _idx2: _U32 + _U32,
    _memarg: _MEMARG,
    skip_blocktype: _BLOCKTYPE,
    _s32: _S32,
    _s64: _S64,
    _f32: b".{4}",
    _f64: b".{8}",
    _bytes16: b".{16}",
    _lane: b".",
    _memarg_lane: _MEMARG + b".",
    _heap: _HEAPTYPE,
    _fence: b"\\x00",
}


@functools.cache
def _fast_pattern() -> re.Pattern[bytes]:
    # One alternative per (prefix, immediates) group, its opcodes in one character class.
    # Subopcodes match in their shortest LEB form only; longer forms take the exact path.
    groups: dict[tuple[bytes, bytes, Immediates], list[int]] = {}
    for op, immediates in _SINGLE.items():
        if op not in NOTABLE and immediates in _FAST_TAILS:
            groups.setdefault((b"", b"", immediates), []).append(op)
    for prefix, table in _PREFIXED.items():
        for sub, immediates in table.items():
            if _key(prefix, sub) not in NOTABLE and immediates in _FAST_TAILS:
                lead, high = (sub, b"") if sub < 0x80 else (sub & 0x7F | 0x80, bytes([sub >> 7]))
                groups.setdefault((bytes([prefix]), high, immediates), []).append(lead)
    order = list(_FAST_TAILS)
    # Single-byte groups first, the frequent immediates kinds first: alternatives are tried in turn.
    keys = sorted(groups, key=lambda key: (key[0] != b"", order.index(key[2])))
    alternatives = [
        _literal(prefix) + _class(groups[prefix, high, imm]) + _literal(high) + _FAST_TAILS[imm]
        for prefix, high, imm in keys
    ]
    return re.compile(b"(?:" + b"|".join(alternatives) + b")*+", re.DOTALL)

