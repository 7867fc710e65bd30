"""The container and section decoders: byte-exact round trips, section order, decoded fields."""

from __future__ import annotations

import pytest
import wasmtime

from sidecar.wasmbin import module as ids
from sidecar.wasmbin.module import Module, Section
from sidecar.wasmbin.reader import WasmFormatError, encode_name, encode_unsigned
from sidecar.wasmbin.sections import (
    FUNC,
    GLOBAL,
    MEMORY,
    TABLE,
    TAG,
    Data,
    Export,
    FuncType,
    GlobalType,
    Limits,
    TableType,
    decode,
    encode_data,
    encode_exports,
    encode_globals,
    encode_memories,
)

EVERYTHING = r"""
(module
  (type $v (func))
  (type $ii (func (param i32) (result i32)))
  (rec (type $s (sub (struct (field i32) (field (mut i8))))) (type $a (array (mut i16))))
  (type $s2 (sub final $s (struct (field i32) (field (mut i8)) (field f64))))
  (import "env" "f" (func $imp (type $ii)))
  (import "env" "t" (table 1 funcref))
  (import "env" "m" (memory 1))
  (import "env" "g" (global $ig i32))
  (import "env" "mg" (global $img (mut i64)))
  (import "env" "tag" (tag $e (param i32)))
  (table $t 2 10 funcref)
  (table $t2 1 (ref null $v) (ref.null $v))
  (memory $m2 2 3)
  (memory $m3 i64 1)
  (memory $sh 1 1 shared)
  (global $g1 (mut i64) (i64.const -5))
  (global $g2 f32 (f32.const 1.5))
  (global $g3 i32 (i32.add (global.get $ig) (i32.const 1)))
  (global $g4 (mut funcref) (ref.func $init))
  (global $g5 (mut v128) (v128.const i32x4 1 2 3 4))
  (export "f" (func $imp))
  (export "m2" (memory $m2))
  (export "g1" (global $g1))
  (export "t" (table $t))
  (export "e" (tag $e))
  (start $init)
  (elem (i32.const 0) $init)
  (elem declare func $init)
  (elem $p funcref (ref.func $init) (ref.null func))
  (elem (table $t) (i32.const 1) func $init)
  (data (i32.const 0) "abc")
  (data $pass "passive")
  (data (memory $m2) (i32.const 8) "xyz")
  (func $init (memory.init $pass (i32.const 0) (i32.const 0) (i32.const 0)))
  (func (type $ii) (local i64 f32) (local.get 0))
)
"""

SMALL = [
    "(module)",
    '(module (func (export "f") (result i32) (i32.const 42)))',
    '(module (memory 1) (data (i32.const 8) "hi") (global (mut i32) (i32.const 0)) (start 0) (func))',
    '(module (func $f (param i64) (result i64) (local.get 0)) (table 1 funcref) (elem (i32.const 0) $f))',
    EVERYTHING,
]


def wasm(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def section(section_id: int, payload: bytes, width: int | None = None) -> bytes:
    return bytes([section_id]) + encode_unsigned(len(payload), width=width) + payload


HEADER = b"\0asm\x01\0\0\0"


@pytest.mark.parametrize("text", SMALL)
def test_parse_then_write_is_byte_identical(text):
    original = wasm(text)
    assert Module.parse(original).to_bytes() == original


def test_the_everything_module_is_valid_for_wasmtime():
    wasmtime.Module.validate(wasmtime.Engine(), wasm(EVERYTHING))


def test_padded_section_sizes_survive_untouched_and_shrink_when_rewritten():
    padded_function = section(ids.FUNCTION, b"\x01\x00", width=3)
    original = HEADER + section(ids.TYPE, b"\x01\x60\x00\x00", width=5) + padded_function
    original += section(ids.CODE, b"\x01\x02\x00\x0b", width=5)
    wasmtime.Module.validate(wasmtime.Engine(), original)
    parsed = Module.parse(original)
    assert parsed.to_bytes() == original
    rewritten = parsed.replace(ids.FUNCTION, b"\x01\x00").to_bytes()
    assert rewritten == original.replace(padded_function, section(ids.FUNCTION, b"\x01\x00"))


def test_custom_and_unknown_sections_are_kept_byte_exact_wherever_they_are():
    custom = section(ids.CUSTOM, encode_name("odd \u00e9") + bytes(range(256)))
    unknown = section(0x20, b"\xff\xfe whatever")
    original = HEADER + custom + section(ids.TYPE, b"\x00") + custom + unknown + custom
    parsed = Module.parse(original)
    assert [s.id for s in parsed.sections] == [0, ids.TYPE, 0, 0x20, 0]
    assert parsed.to_bytes() == original
    assert parsed.replace(ids.TYPE, b"\x00").to_bytes() == original


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "bad magic"),
        (b"\0asn\x01\0\0\0", "bad magic"),
        (b"\0asm\x02\0\0\0", "unsupported wasm version"),
        (b"\0asm\x0d\0\x01\0", "a component"),
        (HEADER + b"\x01", "unexpected end"),
        (HEADER + b"\x01\x05\x00", "5 bytes announced, 1 available"),
        (HEADER + section(ids.TYPE, b"\x00") * 2, "out of order or repeated"),
        (HEADER + section(ids.MEMORY, b"\x00") + section(ids.TABLE, b"\x00"), "out of order"),
        (HEADER + section(ids.CODE, b"\x00") + section(ids.DATA_COUNT, b"\x00"), "out of order"),
        (HEADER + section(ids.CUSTOM, b"\x05ab"), "5 bytes announced"),
        (HEADER + section(ids.CUSTOM, b"\x01\xff"), "not valid UTF-8"),
    ],
)
def test_malformed_containers_are_refused(data, message):
    with pytest.raises(WasmFormatError, match=message):
        Module.parse(data)


def test_the_tag_section_sits_between_memory_and_global():
    data = HEADER + section(ids.MEMORY, b"\x00") + section(ids.TAG, b"\x00") + section(ids.GLOBAL, b"\x00")
    assert Module.parse(data).to_bytes() == data
    with pytest.raises(WasmFormatError, match="out of order"):
        Module.parse(HEADER + section(ids.GLOBAL, b"\x00") + section(ids.TAG, b"\x00"))


def test_replace_inserts_in_canonical_order_before_trailing_custom_sections():
    base = Module.parse(wasm('(module $named (memory 1) (func (export "f")))'))
    assert [s.id for s in base.sections] == [ids.TYPE, ids.FUNCTION, ids.MEMORY, ids.EXPORT, ids.CODE, ids.CUSTOM]
    grown = base.replace(ids.DATA, b"\x00").replace(ids.GLOBAL, b"\x00").replace(ids.TABLE, b"\x00")
    expected = [ids.TYPE, ids.FUNCTION, ids.TABLE, ids.MEMORY, ids.GLOBAL, ids.EXPORT, ids.CODE, ids.DATA, 0]
    assert [s.id for s in grown.sections] == expected
    assert Module.parse(grown.to_bytes()) == Module.parse(grown.to_bytes())
    assert [s.id for s in grown.replace(ids.GLOBAL, None).sections] == [i for i in expected if i != ids.GLOBAL]
    assert base.replace(ids.START, None) is base
    assert [s.id for s in Module(()).replace(ids.EXPORT, b"\x00").sections] == [ids.EXPORT]


def test_decode_reads_every_known_section():
    d = decode(Module.parse(wasm(EVERYTHING)))
    assert d.types[:2] == (FuncType((), ()), FuncType(("i32",), ("i32",)))
    assert d.types[2:5] == (None, None, None)  # struct, array, struct subtype
    kinds = [("f", FUNC), ("t", TABLE), ("m", MEMORY), ("g", GLOBAL), ("mg", GLOBAL), ("tag", TAG)]
    assert [(i.module, i.name, i.kind) for i in d.imports] == [("env", name, kind) for name, kind in kinds]
    assert d.imports[4].type == GlobalType("i64", mutable=True)
    assert d.functions == (0, 1)
    assert d.tables == (TableType("funcref", Limits(2, 10)), TableType("(ref null 0)", Limits(1, None)))
    assert d.memories == (Limits(2, 3), Limits(1, None, index64=True), Limits(1, 1, shared=True))
    assert [(g.type.valtype, g.type.mutable) for g in d.globals] == [
        ("i64", True),
        ("f32", False),
        ("i32", False),
        ("funcref", True),
        ("v128", True),
    ]
    assert d.globals[0].init == b"\x42\x7b\x0b"  # i64.const -5
    assert d.globals[2].init == b"\x23\x00\x41\x01\x6a\x0b"  # extended const
    assert d.exports[:3] == (Export("f", FUNC, 0), Export("m2", MEMORY, 1), Export("g1", GLOBAL, 2))
    assert d.start == 1
    elements = [("active", 1), ("declarative", 1), ("passive", 2), ("active", 1)]
    assert [(e.mode, e.count) for e in d.elements] == elements
    assert d.data_count == 3
    assert [(s.memory, s.offset, s.init) for s in d.data] == [
        (0, b"\x41\x00\x0b", b"abc"),
        (None, None, b"passive"),
        (1, b"\x41\x08\x0b", b"xyz"),
    ]
    assert len(d.code) == 2
    assert d.imported(GLOBAL) == d.imports[3:5]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (section(ids.FUNCTION, b"\x01\x00"), "1 functions declared, 0 bodies"),
        (section(ids.DATA_COUNT, b"\x01"), "data count 1 but 0 data segments"),
        (section(ids.TYPE, b"\x00\x00"), "trailing bytes in type section"),
        (section(ids.TYPE, b"\x01\x61"), "unknown type form 0x61"),
        (section(ids.TYPE, b"\x01\x60\x01\x55\x00"), "unknown value type 0x55"),
        (section(ids.IMPORT, b"\x01\x01a\x01b\x05"), "unknown import kind 5"),
        (section(ids.MEMORY, b"\x01\x10\x00"), "invalid limits flags"),
        (section(ids.MEMORY, b"\x01\x01\x02\x01"), "maximum below minimum"),
        (section(ids.TABLE, b"\x01\x70\x02\x00"), "invalid limits flags"),
        (section(ids.TABLE, b"\x01\x7f\x00\x00"), "expected a reference type"),
        (section(ids.GLOBAL, b"\x01\x7f\x02\x41\x00\x0b"), "invalid mutability"),
        (section(ids.GLOBAL, b"\x01\x7f\x00\x41\x00"), "unexpected end"),
        (section(ids.GLOBAL, b"\x01\x7f\x00\x02\x40\x0b\x0b"), "block instruction in a constant"),
        (section(ids.EXPORT, b"\x01\x01a\x09\x00"), "unknown export kind"),
        (section(ids.START, b"\x00\x00"), "trailing bytes in start section"),
        (section(ids.ELEMENT, b"\x01\x08"), "invalid element segment flags"),
        (section(ids.ELEMENT, b"\x01\x01\x01\x00"), "unknown element kind"),
        (section(ids.DATA, b"\x01\x03"), "invalid data segment flags"),
        (section(ids.DATA, b"\x01\x01\x05ab"), "5 bytes announced"),
        (section(ids.CODE, b"\x01\x09\x00"), "9 bytes announced"),
    ],
)
def test_decode_refuses_malformed_sections(sections, message):
    with pytest.raises(WasmFormatError, match=message):
        decode(Module.parse(HEADER + sections))


def test_encoders_round_trip_through_decode():
    d = decode(Module.parse(wasm(EVERYTHING)))
    memories = (
        Limits(5, None),
        Limits(1, 2**40, index64=True),
        Limits(3, 9, shared=True),
        Limits(1, 1, page_size_log2=0),
    )
    exports = (Export("a", FUNC, 0), Export("\u00e9", MEMORY, 300))
    data = (Data(0, b"\x41\x00\x0b", b"abc"), Data(None, None, b""), Data(7, b"\x41\x7f\x0b", b"x" * 200))
    module = Module(())
    for section_id, payload in [
        (ids.MEMORY, encode_memories(memories)),
        (ids.GLOBAL, encode_globals(d.globals)),
        (ids.EXPORT, encode_exports(exports)),
        (ids.DATA, encode_data(data)),
    ]:
        module = module.replace(section_id, payload)
    again = decode(Module.parse(module.to_bytes()))
    assert (again.memories, again.globals, again.exports, again.data) == (memories, d.globals, exports, data)


def test_sections_read_without_copying_the_module():
    original = wasm(SMALL[2])
    parsed = Module.parse(original)
    assert all(s.source is original for s in parsed.sections)
    assert Section.new(ids.TYPE, b"\x00").reader().u8() == 0
