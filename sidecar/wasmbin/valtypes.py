"""Value, heap and block types: decoding them and naming them in text-format spelling.

Owns the type grammar shared by sections and instructions (numeric types, the abstract
reference shorthands, `(ref null? ht)` with concrete type indices, block types). Names are
strings such as `i32`, `funcref` or `(ref null 3)`. Knows nothing about whether a type index
exists or what it refers to; that is validation, which wasmtime does.
"""

from __future__ import annotations

from .reader import Reader, WasmFormatError

NUMERIC = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128"}

# Abstract heap types, by their one-byte encoding (a negative s33 in a type position).
ABSTRACT_HEAP = {
    0x70: "func",
    0x6F: "extern",
    0x6E: "any",
    0x6D: "eq",
    0x6C: "i31",
    0x6B: "struct",
    0x6A: "array",
    0x69: "exn",
    0x71: "none",
    0x72: "noextern",
    0x73: "nofunc",
    0x74: "noexn",
}
# The shorthand byte `xxxref` means `(ref null xxx)`; bottom types spell as `nullxxxref`.
_SHORTHAND = {code: f"{name}ref" for code, name in ABSTRACT_HEAP.items()} | {
    0x71: "nullref",
    0x72: "nullexternref",
    0x73: "nullfuncref",
    0x74: "nullexnref",
}
_REF_NULL, _REF = 0x63, 0x64
_VALTYPE_BYTES = frozenset(NUMERIC) | frozenset(ABSTRACT_HEAP) | {_REF_NULL, _REF}
_EMPTY_BLOCK = 0x40


def read_heaptype(r: Reader) -> str:
    start = r.pos
    value = r.s33()
    if value >= 0:
        return str(value)
    name = ABSTRACT_HEAP.get(value + 0x80)
    if name is None:
        raise WasmFormatError(f"unknown heap type {value}", start)
    return name


def read_valtype(r: Reader) -> str:
    start = r.pos
    code = r.u8()
    name = NUMERIC.get(code) or _SHORTHAND.get(code)
    if name is not None:
        return name
    if code == _REF_NULL:
        return f"(ref null {read_heaptype(r)})"
    if code == _REF:
        return f"(ref {read_heaptype(r)})"
    raise WasmFormatError(f"unknown value type 0x{code:02x}", start)


def read_reftype(r: Reader) -> str:
    start = r.pos
    valtype = read_valtype(r)
    if is_numeric(valtype):
        raise WasmFormatError(f"expected a reference type, got {valtype}", start)
    return valtype


def skip_blocktype(r: Reader) -> None:
    """Empty, one value type, or a non-negative s33 type index."""
    code = r.peek()
    if code == _EMPTY_BLOCK:
        r.pos += 1
    elif code in _VALTYPE_BYTES:
        read_valtype(r)
    else:
        start = r.pos
        if r.s33() < 0:
            raise WasmFormatError("invalid block type", start)


def is_numeric(valtype: str) -> bool:
    return valtype in NUMERIC.values()
