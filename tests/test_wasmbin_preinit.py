"""Pre-initialization: capture an instance, rebuild it as a module, and check a fresh instance."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import wasmtime

from sidecar.wasmbin import START_EXPORT, Instrumented, SnapshotError, instrument, preinitialize
from sidecar.wasmbin import preinit as preinit_module
from sidecar.wasmbin.module import Module
from sidecar.wasmbin.reader import Reader
from sidecar.wasmbin.sections import decode

ENGINE = wasmtime.Engine()
PAGE = 65536

COUNTER = """
(module
  (memory 2 100)
  (global $count (mut i32) (i32.const 0))
  (global $big (mut i64) (i64.const 0))
  (global $quarter (mut f32) (f32.const 0))
  (global $half (mut f64) (f64.const 0))
  (global $fixed i32 (i32.const 1234))
  (data (i32.const 1000) "initial data")
  (func $init (global.set $count (i32.const 10)))
  (start $init)
  (func (export "tick") (result i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (i32.store (i32.mul (global.get $count) (i32.const 4)) (global.get $count))
    (global.set $big (i64.add (i64.mul (global.get $big) (i64.const 3)) (i64.const 1)))
    (global.set $quarter (f32.add (global.get $quarter) (f32.const 0.25)))
    (global.set $half (f64.sub (global.get $half) (f64.const 1.5)))
    (global.get $count))
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
  (func (export "poke") (param i32 i32) (i32.store8 (local.get 0) (local.get 1)))
  (func (export "state") (result i64) (global.get $big)))
"""


def wasm(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


@pytest.fixture
def instantiate() -> Iterator[Callable[[bytes], tuple[wasmtime.Store, Any]]]:
    """`instantiate(wasm)` -> (store, exports) in a fresh store; stores are closed after the test."""
    stores: list[wasmtime.Store] = []

    def make(binary: bytes) -> tuple[wasmtime.Store, Any]:
        store = wasmtime.Store(ENGINE)
        stores.append(store)
        return store, wasmtime.Instance(store, wasmtime.Module(ENGINE, binary), []).exports(store)

    yield make
    for store in stores:
        store.close()


def capture(info: Instrumented, store: wasmtime.Store, exports: Any) -> tuple[dict[int, bytes], dict[int, Any]]:
    """What the sidecar captures: every defined memory and mutable global, through our exports."""
    memories = {}
    for index, name in info.memories:
        memory = exports[name]
        memories[index] = memory.read(store, 0, memory.data_len(store))
    return memories, {index: exports[name].value(store) for index, name, _type in info.globals}


def test_a_fresh_instance_of_the_output_continues_where_the_snapshot_stopped(instantiate):
    info = instrument(wasm(COUNTER))
    store, live = instantiate(info.wasm)
    live[START_EXPORT](store)
    for _ in range(5):
        live["tick"](store)
    assert live["grow"](store, 3) == 2
    live["poke"](store, 3 * PAGE + 5, 7)
    live["poke"](store, 1000, 0)  # overwrite part of the original data segment
    memories, globals_ = capture(info, store, live)
    assert globals_ == {0: 15, 1: 121, 2: 1.25, 3: -7.5}

    output = preinitialize(info.wasm, memories, globals_)
    decoded = decode(Module.parse(output))
    assert decoded.start is None
    assert (decoded.memories[0].minimum, decoded.memories[0].maximum) == (5, 100)
    assert START_EXPORT not in {e.name for e in decoded.exports}
    assert {"__sidecar_memory_0", "__sidecar_global_0", "__sidecar_global_3"} <= {e.name for e in decoded.exports}

    fresh_store, fresh = instantiate(output)
    assert capture(info, fresh_store, fresh) == (memories, globals_)
    for _ in range(3):
        assert fresh["tick"](fresh_store) == live["tick"](store)
    assert fresh["state"](fresh_store) == live["state"](store) == 3280
    assert capture(info, fresh_store, fresh) == capture(info, store, live)


def test_the_output_can_be_instrumented_and_snapshotted_again(instantiate):
    info = instrument(wasm(COUNTER))
    store, live = instantiate(info.wasm)
    live[START_EXPORT](store)
    live["tick"](store)
    first = preinitialize(info.wasm, *capture(info, store, live))

    again = instrument(first)
    assert again.wasm == first and again.snapshottable and again.start_export is None
    assert again.memories == info.memories and again.globals == info.globals
    store, second_live = instantiate(again.wasm)
    assert second_live["tick"](store) == 12
    assert second_live["grow"](store, 1) == 2
    second = preinitialize(again.wasm, *capture(again, store, second_live))

    store, third = instantiate(second)
    assert third["tick"](store) == 13
    assert third["grow"](store, 0) == 3


def test_the_original_module_is_accepted_in_place_of_the_instrumented_one(instantiate):
    original = wasm(COUNTER)
    info = instrument(original)
    store, live = instantiate(info.wasm)
    state = capture(info, store, live)
    assert preinitialize(original, *state) == preinitialize(info.wasm, *state)


def test_a_big_sparse_memory_becomes_a_small_module(instantiate):
    poke = '(func (export "poke") (param i32 i32) (i32.store8 (local.get 0) (local.get 1)))'
    info = instrument(wasm(f"(module (memory 1024) {poke})"))
    store, live = instantiate(info.wasm)
    spots = {0: 1, 12345: 2, 40 * 1024 * 1024: 3, 64 * 1024 * 1024 - 1: 4}
    for address, value in spots.items():
        live["poke"](store, address, value)
    memories, globals_ = capture(info, store, live)
    output = preinitialize(info.wasm, memories, globals_)
    assert len(output) < 1024
    assert len(decode(Module.parse(output)).data) == len(spots)
    store, fresh = instantiate(output)
    assert capture(info, store, fresh)[0] == memories


PASSIVE = """
(module
  (memory 1)
  (data $a (i32.const 0) "AAAA")
  (data $p1 "passive-one")
  (data $b (i32.const 100) "BBBB")
  (data $c (i32.const 200) "CCCC")
  (data $p2 "passive-two")
  (func (export "load") (param $which i32) (param $to i32)
    (if (local.get $which)
      (then (memory.init $p2 (local.get $to) (i32.const 0) (i32.const 11)))
      (else (memory.init $p1 (local.get $to) (i32.const 0) (i32.const 11)))))
  (func (export "touch_active") (memory.init $c (i32.const 0) (i32.const 0) (i32.const 0)))
  (func (export "poke") (param i32 i32) (i32.store8 (local.get 0) (local.get 1))))
"""


@pytest.mark.parametrize(
    ("pokes", "expected_segments"),
    [
        ({5000: 1, 6000: 2}, 7),  # 5 runs for 3 active slots: two appended after the passive ones
        ({0: 0, 1: 0, 2: 0, 3: 0, 100: 0, 101: 0, 102: 0, 103: 0, 200: 0, 201: 0, 202: 0, 203: 0}, 5),
    ],
)
def test_passive_segments_keep_their_indices(instantiate, pokes, expected_segments):
    info = instrument(wasm(PASSIVE))
    store, live = instantiate(info.wasm)
    for address, value in pokes.items():
        live["poke"](store, address, value)
    memories, globals_ = capture(info, store, live)
    output = preinitialize(info.wasm, memories, globals_)

    decoded = decode(Module.parse(output))
    assert decoded.data_count == len(decoded.data) == expected_segments
    assert (decoded.data[1].memory, decoded.data[1].init) == (None, b"passive-one")
    assert (decoded.data[4].memory, decoded.data[4].init) == (None, b"passive-two")
    assert [s.memory for s in decoded.data].count(None) == 2

    store, fresh = instantiate(output)
    assert capture(info, store, fresh)[0] == memories
    fresh["touch_active"](store)  # an active index is still valid (and dropped) after the rewrite
    fresh["load"](store, 0, 300)
    fresh["load"](store, 1, 400)
    memory = fresh["__sidecar_memory_0"]
    assert memory.read(store, 300, 311) == b"passive-one" and memory.read(store, 400, 411) == b"passive-two"


def segments_for(instantiate, contents: dict[int, bytes]) -> list[tuple[int, bytes]]:
    info = instrument(wasm('(module (memory 1) (func (export "f")))'))
    memory = bytearray(PAGE)
    for address, raw in contents.items():
        memory[address : address + len(raw)] = raw
    output = preinitialize(info.wasm, {0: bytes(memory)}, {})
    store, fresh = instantiate(output)
    assert capture(info, store, fresh)[0] == {0: bytes(memory)}
    return [(Reader(s.offset or b"", 1).s32(), s.init) for s in decode(Module.parse(output)).data]


def test_short_zero_gaps_are_merged_and_long_ones_split(instantiate):
    assert segments_for(instantiate, {10: b"ab", 19: b"cd"}) == [(10, b"ab" + bytes(7) + b"cd")]
    assert segments_for(instantiate, {10: b"ab", 20: b"cd"}) == [(10, b"ab"), (20, b"cd")]
    assert segments_for(instantiate, {0: b"\x01", PAGE - 1: b"\x02"}) == [(0, b"\x01"), (PAGE - 1, b"\x02")]
    assert segments_for(instantiate, {}) == []


def test_the_segment_count_is_capped_by_merging_the_smallest_gaps(instantiate, monkeypatch):
    monkeypatch.setattr(preinit_module, "SNAPSHOT_DATA_SEGMENTS_MAX", 3)
    layout = {0: b"a", 100: b"b", 120: b"c", 1000: b"d", 1050: b"e"}
    assert segments_for(instantiate, layout) == [
        (0, b"a"),
        (100, b"b" + bytes(19) + b"c"),
        (1000, b"d" + bytes(49) + b"e"),
    ]


def test_addresses_past_2_gib_wrap_into_the_signed_immediate():
    for address in (0, 2**31 - 1, 2**31, 2**32 - 1):
        expression = preinit_module._offset(address)
        assert expression[0] == 0x41 and expression[-1] == 0x0B
        assert Reader(expression, 1).s32() % 2**32 == address


TYPED = """
(module
  (global $i (mut i32) (i32.const 0))
  (global $l (mut i64) (i64.const 0))
  (global $f (mut f32) (f32.const 0))
  (global $d (mut f64) (f64.const 0))
  (global $v (mut v128) (v128.const i64x2 0 0))
  (func (export "bits") (result i32 i64 i32 i64 i64 i64)
    (global.get $i) (global.get $l)
    (i32.reinterpret_f32 (global.get $f)) (i64.reinterpret_f64 (global.get $d))
    (i64x2.extract_lane 0 (global.get $v)) (i64x2.extract_lane 1 (global.get $v))))
"""


@pytest.mark.parametrize(
    ("values", "bits"),
    [
        ({0: -1, 1: -(2**63), 2: 1.5, 3: -0.0}, [-1, -(2**63), 0x3FC00000, -(2**63)]),
        ({0: 2**32 - 1, 1: 2**64 - 1, 2: float("inf"), 3: 2.5}, [-1, -1, 0x7F800000, 0x4004000000000000]),
        (
            {
                0: (7).to_bytes(4, "little"),
                1: 5,
                2: struct.pack("<I", 0x7FC00001),
                3: struct.pack("<Q", 0x7FF0000000000001),
            },
            [7, 5, 0x7FC00001, 0x7FF0000000000001],  # NaN payloads exact when given as bits
        ),
    ],
)
def test_global_initializers_are_exact(instantiate, values, bits):
    v128 = (1).to_bytes(8, "little") + (-2).to_bytes(8, "little", signed=True)
    output = preinitialize(wasm(TYPED), {}, {**values, 4: v128})
    store, fresh = instantiate(output)
    assert fresh["bits"](store) == [*bits, 1, -2]


COUNTER_STATE = ({0: bytes(2 * PAGE)}, {0: 1, 1: 2, 2: 0.5, 3: 1.5})


@pytest.mark.parametrize(
    ("memories", "globals_", "message"),
    [
        ({}, COUNTER_STATE[1], r"memory indices \[\] do not match the module's \[0\]"),
        ({0: bytes(2 * PAGE), 1: b""}, COUNTER_STATE[1], "memory indices"),
        (COUNTER_STATE[0], {**COUNTER_STATE[1], 4: 1}, r"global indices \[0, 1, 2, 3, 4\]"),
        (COUNTER_STATE[0], {0: 1}, "global indices"),
        ({0: bytes(2 * PAGE + 1)}, COUNTER_STATE[1], "not a whole number of pages"),
        ({0: bytes(PAGE)}, COUNTER_STATE[1], "1 pages, below the minimum"),
        ({0: bytes(101 * PAGE)}, COUNTER_STATE[1], "101 pages, above the maximum"),
        (COUNTER_STATE[0], {**COUNTER_STATE[1], 0: "1"}, r"global 0 \(i32\) cannot take a str"),
        (COUNTER_STATE[0], {**COUNTER_STATE[1], 0: True}, "cannot take a bool"),
        (COUNTER_STATE[0], {**COUNTER_STATE[1], 0: 1.0}, "cannot take a float"),
        (COUNTER_STATE[0], {**COUNTER_STATE[1], 0: 2**32}, "does not fit i32"),
        (COUNTER_STATE[0], {**COUNTER_STATE[1], 1: -(2**63) - 1}, "does not fit i64"),
        (COUNTER_STATE[0], {**COUNTER_STATE[1], 2: 1e300}, "does not fit f32"),
        (COUNTER_STATE[0], {**COUNTER_STATE[1], 3: b"\0" * 4}, r"global 3 \(f64\) needs 8 bytes, got 4"),
    ],
)
def test_state_that_does_not_fit_the_module_is_refused(memories, globals_, message):
    with pytest.raises(SnapshotError, match=message):
        preinitialize(wasm(COUNTER), memories, globals_)


def test_an_unsnapshottable_module_is_refused_with_its_reasons():
    text = """(module (import "env" "m" (memory 1)) (table 1 funcref)
        (func (table.set (i32.const 0) (ref.null func))))"""
    reasons = r"imports a memory \(env.m\); mutates a table \(table.set in function 0\)"
    with pytest.raises(SnapshotError, match=reasons):
        preinitialize(wasm(text), {}, {})


def test_a_module_without_memories_or_globals_loses_only_its_start():
    info = instrument(wasm('(module (func $s) (start $s) (func (export "f")))'))
    output = preinitialize(info.wasm, {}, {})
    assert [e.name for e in decode(Module.parse(output)).exports] == ["f"]
    wasmtime.Module.validate(ENGINE, output)
