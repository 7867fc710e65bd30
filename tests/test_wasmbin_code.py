"""The instruction scanner: every opcode family walks, only real instructions are reported."""

from __future__ import annotations

import re

import pytest
import wasmtime
from hypothesis import given
from hypothesis import strategies as st

from sidecar.wasmbin import code
from sidecar.wasmbin.code import read_const_expr, scan_function
from sidecar.wasmbin.module import Module
from sidecar.wasmbin.reader import Reader, WasmFormatError
from sidecar.wasmbin.sections import decode
from sidecar.wasmbin.valtypes import read_valtype

# One function per family of instructions; valid for wasmtime with its default features.
EVERY_FAMILY = r"""
(module
  (type $v (func))
  (type $i (func (param i32) (result i32)))
  (type $s (struct (field (mut i32)) (field i8)))
  (type $a (array (mut i32)))
  (type $b (array i8))
  (memory $m0 1 1 shared)
  (memory $m1 1)
  (table $t 2 funcref)
  (table $t2 2 funcref)
  (tag $x (param i32))
  (global $g (mut i32) (i32.const 0))
  (data $d "abc")
  (elem $e func $nop)
  (elem declare func $ident)
  (func $nop (type $v))
  (func $ident (type $i) (local.get 0))
  (func $control (param i32) (result i32) (local i64)
    (block $out (result i32)
      (loop $l
        (br_if $l (i32.eqz (local.get 0)))
        (if (local.get 0) (then nop) (else unreachable))
        (block $a (block $b (block $c
          (br_table $a $b $c (local.get 0)))))
        (drop (select (i32.const 1) (i32.const 2) (local.get 0)))
        (drop (select (result i64) (i64.const 1) (i64.const 2) (local.get 0)))
        (call $nop)
        (drop (call_indirect $t (type $i) (i32.const 7) (i32.const 0)))
        (local.set 1 (i64.const 38))
        (global.set $g (i32.const 0x26))
        (br $out (local.tee 0 (i32.const 0xfc))))
      (i32.const 0)))
  (func $tail (param i32) (result i32)
    (if (local.get 0) (then (return_call $ident (i32.const 1))))
    (return_call_indirect $t (type $i) (i32.const 2) (i32.const 1)))
  (func $numeric (param i32 i64 f32 f64) (result i32)
    (drop (i32.const -1)) (drop (i32.const 0x7fffffff)) (drop (i32.const -2147483648))
    (drop (i64.const -9223372036854775808)) (drop (i64.const 0x7fffffffffffffff))
    (drop (f32.const nan:0x200000)) (drop (f64.const -inf)) (drop (f32.const 0x1.8p3))
    (drop (i64.extend_i32_s (i32.extend8_s (local.get 0))))
    (drop (i32.trunc_sat_f32_s (local.get 2))) (drop (i64.trunc_sat_f64_u (local.get 3)))
    (drop (f64.promote_f32 (f32.demote_f64 (local.get 3))))
    (drop (i64.extend32_s (local.get 1)))
    (i32.wrap_i64 (i64.popcnt (local.get 1))))
  (func $memory (param i32) (result i32)
    (i32.store offset=4 align=2 (local.get 0) (i32.load8_u offset=100000 (local.get 0)))
    (i64.store $m1 offset=0xfffffff0 (local.get 0) (i64.load $m1 (local.get 0)))
    (f64.store (i32.const 0) (f64.load align=1 (i32.const 8)))
    (memory.copy $m1 $m0 (i32.const 0) (i32.const 0) (i32.const 1))
    (memory.fill $m1 (i32.const 0) (i32.const 0) (i32.const 1))
    (memory.init $d (i32.const 0) (i32.const 0) (i32.const 1))
    (drop (memory.size $m1))
    (i32.add (memory.size) (i32.const 0x40)))
  (func $grow (result i32) (memory.grow $m1 (i32.const 1)))
  (func $reftable (param i32) (result i32)
    (drop (ref.is_null (ref.null func)))
    (drop (ref.func $ident))
    (drop (table.get $t (local.get 0)))
    (table.size $t))
  (func $tset (table.set $t (i32.const 0) (ref.null func)))
  (func $tgrow (result i32) (table.grow $t (ref.null func) (i32.const 1)))
  (func $tfill (table.fill $t (i32.const 0) (ref.null func) (i32.const 1)))
  (func $tcopy (table.copy $t $t2 (i32.const 0) (i32.const 0) (i32.const 1)))
  (func $tinit (table.init $t $e (i32.const 0) (i32.const 0) (i32.const 1)))
  (func $edrop (elem.drop $e))
  (func $ddrop (data.drop $d))
  (func $simd (param v128) (result i32)
    (local $w v128)
    (local.set $w (v128.const i8x16 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15))
    (local.set $w (i8x16.shuffle 0 17 2 19 4 21 6 23 8 25 10 27 12 29 14 31 (local.get 0) (local.get $w)))
    (local.set $w (i32x4.replace_lane 3 (local.get $w) (i32.const 9)))
    (local.set $w (v128.load8_lane 15 (i32.const 0) (local.get $w)))
    (v128.store16_lane offset=2 7 (i32.const 0) (local.get $w))
    (local.set $w (v128.load32_zero (i32.const 0)))
    (local.set $w (v128.load $m1 offset=16 (i32.const 0)))
    (local.set $w (i16x8.avgr_u (local.get $w) (i16x8.splat (i32.const 1))))
    (local.set $w (f64x2.convert_low_i32x4_u (i32x4.dot_i16x8_s (local.get $w) (local.get $w))))
    (local.set $w (i8x16.relaxed_swizzle (local.get $w) (local.get $w)))
    (local.set $w (i32x4.relaxed_dot_i8x16_i7x16_add_s (local.get $w) (local.get $w) (local.get $w)))
    (v128.store (i32.const 0) (v128.bitselect (local.get $w) (local.get 0) (local.get $w)))
    (i8x16.extract_lane_u 15 (local.get $w)))
  (func $atomics (param i32) (result i32)
    (drop (i32.atomic.load (local.get 0)))
    (i64.atomic.store offset=8 (local.get 0) (i64.const 1))
    (drop (i32.atomic.rmw.add (local.get 0) (i32.const 1)))
    (drop (i64.atomic.rmw32.cmpxchg_u (local.get 0) (i64.const 1) (i64.const 2)))
    (drop (memory.atomic.notify (local.get 0) (i32.const 1)))
    (drop (memory.atomic.wait32 (local.get 0) (i32.const 1) (i64.const 0)))
    (atomic.fence)
    (i32.const 0))
  (func $exceptions (param i32) (result i32)
    (block $none
      (block $h (result i32)
        (block $hr (result i32 exnref)
          (block $any (result exnref)
            (try_table (catch $x $h) (catch_ref $x $hr) (catch_all_ref $any) (catch_all $none)
              (throw $x (local.get 0)))
            (unreachable))
          (throw_ref))
        (throw_ref))
      (return))
    (i32.const 0))
  (func $funcrefs (param $f (ref null $i)) (result i32)
    (block $null
      (local.set $f (br_on_null $null (local.get $f)))
      (return (call_ref $i (i32.const 1) (local.get $f))))
    (block $nn (result (ref $i))
      (br_on_non_null $nn (local.get $f))
      (return (i32.const 0)))
    (drop)
    (call_ref $i (i32.const 2) (ref.as_non_null (local.get $f))))
  (func $gc (param anyref externref) (result i32)
    (local $s (ref null $s))
    (local.set $s (struct.new $s (i32.const 1) (i32.const 2)))
    (struct.set $s 0 (local.get $s) (i32.const 3))
    (drop (struct.get_s $s 1 (local.get $s)))
    (drop (struct.new_default $s))
    (drop (array.len (array.new_fixed $a 3 (i32.const 1) (i32.const 2) (i32.const 3))))
    (drop (array.get $a (array.new $a (i32.const 0) (i32.const 4)) (i32.const 1)))
    (drop (array.new_data $b $d (i32.const 0) (i32.const 1)))
    (drop (ref.test (ref $s) (local.get 0)))
    (drop (ref.cast (ref null $s) (local.get 0)))
    (drop (block $l (result (ref $s)) (br_on_cast $l anyref (ref $s) (local.get 0)) (drop) (unreachable)))
    (drop (any.convert_extern (local.get 1)))
    (drop (i31.get_s (ref.i31 (i32.const 7))))
    (drop (ref.eq (local.get $s) (local.get $s)))
    (i32.const 0))
  (func $wide (param i64 i64 i64 i64) (result i64)
    (drop (i64.add128 (local.get 0) (local.get 1) (local.get 2) (local.get 3)))))
"""

NOTABLE_BY_FUNCTION = {
    "grow": {"memory.grow"},
    "tset": {"table.set"},
    "tgrow": {"table.grow"},
    "tfill": {"table.fill"},
    "tcopy": {"table.copy"},
    "tinit": {"table.init"},
    "edrop": {"elem.drop"},
    "ddrop": {"data.drop"},
}


def bodies(text: str) -> list[tuple[str, Reader]]:
    data = bytes(wasmtime.wat2wasm(text))
    wasmtime.Module.validate(wasmtime.Engine(), data)
    names = re.findall(r"^  \(func \$(\w+)", text, re.MULTILINE)
    decoded = decode(Module.parse(data))
    assert len(names) == len(decoded.code)
    return [(name, body.reader()) for name, body in zip(names, decoded.code, strict=True)]


def exact_only(body: Reader) -> frozenset[str] | tuple[str, int | None]:
    """Scan with the regex fast path disabled; errors as (type, offset) to compare outcomes."""
    fast, code._fast_pattern = code._fast_pattern, lambda: re.compile(b"")
    try:
        return outcome(body)
    finally:
        code._fast_pattern = fast


def outcome(body: Reader) -> frozenset[str] | tuple[str, int | None]:
    try:
        return scan_function(body)
    except WasmFormatError as exc:
        return ("error", exc.offset)


def test_every_instruction_family_walks_and_only_notable_ones_are_reported():
    found = {name: set(scan_function(body)) for name, body in bodies(EVERY_FAMILY)}
    assert found == {name: NOTABLE_BY_FUNCTION.get(name, set()) for name in found}


def test_the_exact_decoder_agrees_with_the_fast_path_on_real_code():
    for _name, body in bodies(EVERY_FAMILY):
        assert exact_only(Reader(body.data, body.pos, body.end)) == outcome(body)


def instructions() -> list[bytes]:
    """Every instruction of EVERY_FAMILY, as encoded, to recombine into hostile bodies."""
    found = []
    for _name, body in bodies(EVERY_FAMILY):
        for _ in range(body.count("local group")):
            body.u32()
            read_valtype(body)
        while not body.at_end():
            start = body.pos
            code._step(body)
            found.append(body.data[start : body.pos])
    return found


INSTRUCTIONS = instructions()


@given(st.lists(st.sampled_from(INSTRUCTIONS) | st.binary(min_size=1, max_size=4), max_size=40))
def test_fast_path_and_exact_decoder_agree_on_any_body(pieces):
    raw = b"\x00" + b"".join(pieces) + b"\x0b"
    assert outcome(Reader(raw)) == exact_only(Reader(raw))


def test_immediates_that_look_like_notable_opcodes_are_not_reported():
    body = bytes.fromhex(
        "01 10 7f"  # 16 locals of i32
        "20 0f 1a"  # local.get 15; drop
        "41 26 1a"  # i32.const 38 (the table.set byte)
        "41 fc 00 1a"  # i32.const 124, an 0xfc byte inside
        "02 40 0b"  # block with the empty type: 0x40 is memory.grow elsewhere
        "44 fc 09 fc 0f 26 40 fc 11 1a"  # f64.const whose bits spell notable opcodes
        "fd 0c fc 0f 00 fc 0c 00 00 26 00 40 00 00 00 00 00 00 1a"  # v128.const likewise
        "0b"
    )
    assert scan_function(Reader(body)) == frozenset()


def test_overlong_subopcodes_take_the_exact_path_and_are_still_found():
    body = bytes.fromhex("00" "fc 89 00 00" "41 00 d0 70 41 01 fc 8f 80 00 00 1a" "0b")
    assert scan_function(Reader(body)) == {"data.drop", "table.grow"}


@pytest.mark.parametrize(
    ("instruction", "message"),
    [
        ("27", "unknown opcode 0x27"),
        ("e0", "unknown opcode 0xe0"),  # stack switching: not enabled in wasmtime by default
        ("fd 9a 01", "unknown opcode 0xfd 154"),  # a hole in the SIMD table
        ("fc 12 00", "unknown opcode 0xfc 18"),
        ("fb 1f", "unknown opcode 0xfb 31"),
        ("fe 04", "unknown opcode 0xfe 4"),
        ("fe 03 01", "atomic.fence flags must be zero"),
        ("1f 40 01 04 00", "unknown catch clause kind 4"),
        ("fb 18 04 00 6e 6e", "unknown br_on_cast flags"),
        ("02 55", "invalid block type"),
        ("1c 01 55", "unknown value type 0x55"),
        ("02 7f 00 0b", None),  # valid: a block typed i32 (whose body we do not type-check)
        ("d0 60", "unknown heap type"),
        ("43 00", "4 bytes announced, 2 available"),  # the final `end` is not an immediate
        ("41 80 80 80 80 80", "longer than 5 bytes"),
        ("0e 05 00", "br_table label count 5 exceeds"),
    ],
)
def test_unknown_opcodes_and_bad_immediates_are_refused_with_their_offset(instruction, message):
    body = Reader(b"\x00\x01" + bytes.fromhex(instruction) + b"\x0b")
    if message is None:
        scan_function(body)
        return
    with pytest.raises(WasmFormatError, match=message) as info:
        scan_function(body)
    assert info.value.offset is not None and 2 <= info.value.offset < len(body.data)


def test_a_body_must_end_with_end():
    with pytest.raises(WasmFormatError, match="does not end with `end`"):
        scan_function(Reader(b"\x00\x01"))
    with pytest.raises(WasmFormatError, match="does not end with `end`"):
        scan_function(Reader(b"\x00"))


def test_constant_expressions_are_read_through_their_end():
    r = Reader(b"\x41\x7f\x41\x01\x6a\x0b\xff")
    assert read_const_expr(r) == b"\x41\x7f\x41\x01\x6a\x0b"
    assert r.pos == 6
    with pytest.raises(WasmFormatError, match="block instruction"):
        read_const_expr(Reader(b"\x02\x40\x0b\x0b"))
    with pytest.raises(WasmFormatError, match="unexpected end"):
        read_const_expr(Reader(b"\x41\x00"))
