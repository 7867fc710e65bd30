"""Naming wasm value types without ever calling `wasm_valtype_kind`, which aborts the process.

In wasmtime 50.0.1 `wasm_valtype_kind` panics (an abort: the panic cannot unwind through C)
for v128 and for every reference type other than externref and funcref (anyref, exnref, GC
struct/array refs). wasmtime-py calls it from `str(ValType)`, `ValType.__eq__` and
`Func.__call__` (which compares each parameter type to externref), so any of those on such a
signature kills the sidecar. This module answers "which type is this?" safely instead.

How: try to create a constant global of the type in a scratch store, with a zero value of each
candidate kind; wasmtime refuses a mismatch with an error, never a panic. Owns nothing else.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable, Sequence

import wasmtime
from wasmtime import _ffi

__all__ = ["RAW_STRUCT_CODES", "raw_layout", "value_type_names"]

# Numeric kinds first (what a call path supports), most common first; v128 last, for the message.
_CANDIDATES = (
    ("i32", _ffi.WASMTIME_I32),
    ("i64", _ffi.WASMTIME_I64),
    ("f64", _ffi.WASMTIME_F64),
    ("f32", _ffi.WASMTIME_F32),
    ("v128", _ffi.WASMTIME_V128),
)
# The numeric kinds as `struct` codes, and the 16-byte `wasmtime_val_raw_t` slot each value takes
# in the arrays that calls in either direction pass.
RAW_STRUCT_CODES = {"i32": "i", "i64": "q", "f32": "f", "f64": "d"}
_RAW_SLOT = ctypes.sizeof(_ffi.wasmtime_val_raw_t)


def raw_layout(kinds: Sequence[str]) -> struct.Struct:
    """Little-endian values of `kinds` (numeric only), one per raw slot: packs or reads a whole
    argument or result array in one step."""
    parts = []
    for kind in kinds:
        code = RAW_STRUCT_CODES[kind]
        parts.append(f"{code}{_RAW_SLOT - struct.calcsize('<' + code)}x")
    return struct.Struct("<" + "".join(parts))


def value_type_names(engine: wasmtime.Engine, valtypes: Iterable[wasmtime.ValType]) -> tuple[str, ...]:
    """"i32", "i64", "f32", "f64", "v128", or "ref" (any reference type) for each of `valtypes`.

    The types must come from `engine` (e.g. `func.type(store).params` of a store on it) and
    stay alive meanwhile (keep the `FuncType` referenced). Costs a scratch store (~4 µs) plus
    ~4 µs per probe: for building call paths and describing modules, not for every call.
    """
    if not isinstance(engine, wasmtime.Engine):
        raise TypeError(f"expected a wasmtime.Engine, got {type(engine).__name__}")
    scratch = wasmtime.Store(engine)
    try:
        context = scratch._context()
        return tuple(_name(context, valtype) for valtype in valtypes)
    finally:
        scratch.close()


def _name(context: object, valtype: wasmtime.ValType) -> str:
    if not isinstance(valtype, wasmtime.ValType):
        raise TypeError(f"expected a wasmtime.ValType, got {type(valtype).__name__}")
    for name, kind in _CANDIDATES:
        # wasm_globaltype_new takes ownership of the valtype: hand it a copy.
        global_type = _ffi.wasm_globaltype_new(_ffi.wasm_valtype_copy(valtype.ptr()), _ffi.WASM_CONST)
        try:
            value = _ffi.wasmtime_val_t(kind=kind)  # zero of that kind
            created = _ffi.wasmtime_global_t()
            error = _ffi.wasmtime_global_new(context, global_type, ctypes.byref(value), ctypes.byref(created))
        finally:
            _ffi.wasm_globaltype_delete(global_type)
        if not error:
            return name
        _ffi.wasmtime_error_delete(error)
    return "ref"
