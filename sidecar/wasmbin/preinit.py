"""Pre-initialization: a standalone module whose fresh instances start in a captured state.

Owns turning an instrumented module plus the memory and mutable-global contents of one of its
instances into a module in the manner of Wizer: memory minimums raised to the snapshot's size,
active data segments replaced by segments for the non-zero runs of memory, mutable global
initializers set, the start function gone (it already ran). The `__sidecar_*` exports other
than `__sidecar_start` stay, so the result can be instrumented and snapshotted again. Knows
nothing about how the state was captured or where the module goes.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import replace

from . import module as ids
from .instrument import START_EXPORT, Instrumented, SnapshotError, instrument
from .module import Module
from .reader import encode_signed, encode_unsigned
from .sections import (
    GLOBAL,
    Data,
    Decoded,
    Global,
    decode,
    encode_data,
    encode_exports,
    encode_globals,
    encode_memories,
)

WASM_PAGE_BYTES = 65536
_MEMORY32_PAGES = (1 << 32) // WASM_PAGE_BYTES  # a 32-bit memory addresses at most 4 GiB
# Engines accept more segments (wasmtime: 100,000); stay well below, as Wizer does.
SNAPSHOT_DATA_SEGMENTS_MAX = 10_000
# A separate segment costs a flags byte, an offset expression and a length (4 to 12 bytes), so
# zero gaps shorter than this many bytes are cheaper to keep inside a segment than to split at.
_MERGE_GAP = 8
_GAP = re.compile(rb"\x00{%d,}" % _MERGE_GAP)

Value = int | float | bytes


def preinitialize(
    instrumented_wasm: bytes, memories: Mapping[int, bytes], globals: Mapping[int, Value]
) -> bytes:
    """The pre-initialized module; `memories` and `globals` are keyed by index space position.

    Every defined memory (whole pages, any bytes-like object) and every mutable global must be
    given, nothing else. Globals take ints (i32/i64, signed or unsigned), floats (f32/f64), or
    raw little-endian bytes of the type's width (exact NaN payloads, v128). Malformed modules
    raise WasmFormatError; unsnapshottable ones and state that does not fit, SnapshotError.
    """
    info = instrument(instrumented_wasm)  # idempotent: accepts either form, and re-checks
    if not info.snapshottable:
        raise SnapshotError("module cannot be snapshotted: " + "; ".join(info.reasons))
    module = Module.parse(info.wasm)
    decoded = decode(module)
    _check_keys("memory", memories, {m.index for m in info.memories})
    _check_keys("global", globals, {g.index for g in info.globals})

    pages = {m.index: _pages(info, position, memories[m.index]) for position, m in enumerate(info.memories)}
    if decoded.memories:
        limits = tuple(
            replace(limit, minimum=pages[memory.index])
            for memory, limit in zip(info.memories, decoded.memories, strict=True)
        )
        module = module.replace(ids.MEMORY, encode_memories(limits))
    if info.globals:
        module = module.replace(ids.GLOBAL, encode_globals(_globals(info, decoded, globals)))
    exports = tuple(e for e in decoded.exports if e.name != START_EXPORT)
    module = module.replace(ids.EXPORT, encode_exports(exports))

    segments = _data(decoded, {index: memories[index] for index in pages})
    if segments or decoded.data:
        module = module.replace(ids.DATA, encode_data(segments))
    if decoded.data_count is not None:
        module = module.replace(ids.DATA_COUNT, encode_unsigned(len(segments)))
    return module.to_bytes()


def _check_keys(what: str, given: Mapping[int, object], expected: set[int]) -> None:
    if set(given) != expected:
        raise SnapshotError(
            f"snapshot {what} indices {sorted(given)} do not match the module's {sorted(expected)}"
        )


def _pages(info: Instrumented, position: int, contents: bytes) -> int:
    index = info.memories[position].index
    if len(contents) % WASM_PAGE_BYTES:
        raise SnapshotError(f"memory {index} snapshot is not a whole number of pages")
    pages = len(contents) // WASM_PAGE_BYTES
    maximum = info.memory_maximums[position]
    if pages < info.memory_minimums[position]:
        raise SnapshotError(f"memory {index} snapshot has {pages} pages, below the minimum")
    if pages > (_MEMORY32_PAGES if maximum is None else maximum):
        raise SnapshotError(f"memory {index} snapshot has {pages} pages, above the maximum")
    return pages


def _globals(info: Instrumented, decoded: Decoded, values: Mapping[int, Value]) -> tuple[Global, ...]:
    base = len(decoded.imported(GLOBAL))
    replaced = list(decoded.globals)
    for exported in info.globals:
        old = replaced[exported.index - base]
        new_init = _const(exported.valtype, values[exported.index], exported.index)
        replaced[exported.index - base] = replace(old, init=new_init)
    return tuple(replaced)


_WIDTHS = {"i32": 4, "i64": 8, "f32": 4, "f64": 8, "v128": 16}


def _const(valtype: str, value: Value, index: int) -> bytes:
    """A constant expression producing exactly `value` (floats by their IEEE bits)."""
    width = _WIDTHS[valtype]
    if isinstance(value, bytes | bytearray):
        if len(value) != width:
            raise SnapshotError(f"global {index} ({valtype}) needs {width} bytes, got {len(value)}")
        raw = bytes(value)
    elif valtype in ("f32", "f64") and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            raw = struct.pack("<f" if valtype == "f32" else "<d", value)
        except OverflowError:
            raise SnapshotError(f"global {index} value {value!r} does not fit {valtype}") from None
    elif valtype in ("i32", "i64") and isinstance(value, int) and not isinstance(value, bool):
        bits = width * 8
        if not -(1 << (bits - 1)) <= value < 1 << bits:
            raise SnapshotError(f"global {index} value {value} does not fit {valtype}")
        raw = (value % (1 << bits)).to_bytes(width, "little")
    else:
        raise SnapshotError(f"global {index} ({valtype}) cannot take a {type(value).__name__}")
    if valtype == "i32":
        return b"\x41" + encode_signed(int.from_bytes(raw, "little", signed=True), 32) + b"\x0b"
    if valtype == "i64":
        return b"\x42" + encode_signed(int.from_bytes(raw, "little", signed=True), 64) + b"\x0b"
    if valtype == "v128":
        return b"\xfd\x0c" + raw + b"\x0b"
    return (b"\x43" if valtype == "f32" else b"\x44") + raw + b"\x0b"


def _data(decoded: Decoded, memories: Mapping[int, bytes]) -> tuple[Data, ...]:
    """New active segments in the slots of the old ones, so passive segments keep their indices.

    The list never gets shorter than the original: `memory.init` and `array.new_data` may name
    any index, and an empty active segment is a valid placeholder (it is dropped at
    instantiation like every active segment).
    """
    runs = _cap([(index, *run) for index, contents in memories.items() for run in _runs(contents)])
    fresh = iter([Data(i, _offset(start), bytes(memories[i][start:end])) for i, start, end in runs])
    segments = [
        segment if segment.memory is None else next(fresh, Data(segment.memory, _offset(0), b""))
        for segment in decoded.data
    ]
    segments.extend(fresh)
    return tuple(segments)


def _offset(address: int) -> bytes:
    # i32.const takes a signed immediate; addresses past 2 GiB wrap to negative numbers.
    signed = address - (1 << 32) if address >= 1 << 31 else address
    return b"\x41" + encode_signed(signed, 32) + b"\x0b"


def _runs(contents: bytes) -> list[tuple[int, int]]:
    """[start, end) of the non-zero stretches of `contents`, merged across short zero gaps."""
    bounds = []
    position = 0
    for gap in _GAP.finditer(contents):
        bounds.append((position, gap.start()))
        position = gap.end()
    bounds.append((position, len(contents)))
    runs = []
    for start, end in bounds:
        # Only at the edges of memory can a run start or end with zeros, fewer than a gap's worth.
        while start < end and contents[start] == 0:
            start += 1
        while end > start and contents[end - 1] == 0:
            end -= 1
        if end > start:
            runs.append((start, end))
    return runs


def _cap(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """At most SNAPSHOT_DATA_SEGMENTS_MAX runs, merging across the smallest gaps within a memory first."""
    excess = len(runs) - SNAPSHOT_DATA_SEGMENTS_MAX
    if excess <= 0:
        return runs
    gaps = sorted(
        (runs[i + 1][1] - runs[i][2], i) for i in range(len(runs) - 1) if runs[i][0] == runs[i + 1][0]
    )
    if len(gaps) < excess:
        raise SnapshotError("too many memories with data to fit the data segment limit")
    merge_after = {i for _, i in gaps[:excess]}
    merged: list[tuple[int, int, int]] = []
    for i, run in enumerate(runs):
        if i - 1 in merge_after:
            index, start, _ = merged[-1]
            merged[-1] = (index, start, run[2])
        else:
            merged.append(run)
    return merged
