"""Instrumentation: exports added without shifting indices, start moved, verdicts and their reasons."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import wasmtime

from sidecar.wasmbin import START_EXPORT, ExportedGlobal, ExportedMemory, WasmFormatError, instrument
from sidecar.wasmbin.module import Module
from sidecar.wasmbin.sections import decode

ENGINE = wasmtime.Engine()

# Imports shift the function and global index spaces, a table dispatches by index, and the
# memory and two mutable globals are not exported: instrumentation must reach them anyway.
CALCULATOR = """
(module
  (import "env" "base" (global $base i32))
  (import "env" "log" (func $log (param i32)))
  (type $binop (func (param i32 i32) (result i32)))
  (table 2 funcref)
  (elem (i32.const 0) $add $mul)
  (memory 1 5)
  (global $acc (mut i32) (i32.const 1))
  (global $k i64 (i64.const 7))
  (global $scale (mut f64) (f64.const 0.5))
  (func $add (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func $mul (param i32 i32) (result i32) (i32.mul (local.get 0) (local.get 1)))
  (func (export "apply") (param $op i32) (param $x i32) (result i32)
    (global.set $acc (call_indirect (type $binop) (global.get $acc) (local.get $x) (local.get $op)))
    (global.set $scale (f64.mul (global.get $scale) (f64.const 3)))
    (i32.store (i32.const 16) (global.get $acc))
    (call $log (global.get $acc))
    (i32.add (global.get $acc) (global.get $base)))
  (func (export "peek") (result i32) (i32.load (i32.const 16))))
"""

STARTED = """
(module
  (memory 1)
  (global $ran (mut i32) (i32.const 0))
  (func $init
    (global.set $ran (i32.add (global.get $ran) (i32.const 1)))
    (i32.store8 (i32.const 0) (i32.const 9)))
  (start $init)
  (func (export "ran") (result i32) (global.get $ran)))
"""


def wasm(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


@pytest.fixture
def instantiate() -> Iterator[Callable[..., tuple[wasmtime.Store, Any]]]:
    """`instantiate(wasm, *imports)` -> (store, exports); stores are closed after the test."""
    stores: list[wasmtime.Store] = []

    def make(binary: bytes, *imports: Any) -> tuple[wasmtime.Store, Any]:
        store = wasmtime.Store(ENGINE)
        stores.append(store)
        resolved = [item(store) if callable(item) else item for item in imports]
        instance = wasmtime.Instance(store, wasmtime.Module(ENGINE, binary), resolved)
        return store, instance.exports(store)

    yield make
    for store in stores:
        store.close()


def calculator_imports(logged: list[int]) -> list[Any]:
    def base(store: wasmtime.Store) -> wasmtime.Global:
        return wasmtime.Global(store, wasmtime.GlobalType(wasmtime.ValType.i32(), False), 100)

    def log(store: wasmtime.Store) -> wasmtime.Func:
        return wasmtime.Func(store, wasmtime.FuncType([wasmtime.ValType.i32()], []), logged.append)

    return [base, log]


def test_exports_reach_internal_state_without_changing_behaviour(instantiate):
    original = wasm(CALCULATOR)
    result = instrument(original)
    assert result.snapshottable and result.reasons == ()
    assert result.memories == (ExportedMemory(0, "__sidecar_memory_0"),)
    assert result.globals == (
        ExportedGlobal(1, "__sidecar_global_1", "i32"),
        ExportedGlobal(3, "__sidecar_global_3", "f64"),
    )
    assert (result.memory_minimums, result.memory_maximums, result.memory64) == ((1,), (5,), (False,))
    assert result.start_export is None and not result.grows_memory

    logs: tuple[list[int], list[int]] = ([], [])
    (store_a, plain), (store_b, instrumented) = (
        instantiate(original, *calculator_imports(logs[0])),
        instantiate(result.wasm, *calculator_imports(logs[1])),
    )
    calls = [(0, 5), (1, 3), (0, -2), (1, 7)]
    assert [plain["apply"](store_a, *c) for c in calls] == [instrumented["apply"](store_b, *c) for c in calls]
    assert logs[0] == logs[1] == [6, 18, 16, 112]
    assert plain["peek"](store_a) == instrumented["peek"](store_b) == 112

    assert instrumented["__sidecar_global_1"].value(store_b) == 112
    assert instrumented["__sidecar_global_3"].value(store_b) == 0.5 * 3**4
    memory = instrumented["__sidecar_memory_0"]
    assert memory.read(store_b, 16, 20) == (112).to_bytes(4, "little")
    assert {e.name for e in decode(Module.parse(result.wasm)).exports} == {
        "apply", "peek", "__sidecar_memory_0", "__sidecar_global_1", "__sidecar_global_3"
    }


def test_the_start_function_runs_only_when_the_sidecar_calls_it(instantiate):
    original = wasm(STARTED)
    store, plain = instantiate(original)
    assert plain["ran"](store) == 1

    result = instrument(original)
    assert result.start_export == START_EXPORT
    assert decode(Module.parse(result.wasm)).start is None
    store, exports = instantiate(result.wasm)
    memory = exports["__sidecar_memory_0"]
    assert exports["ran"](store) == 0 and memory.read(store, 0, 1) == b"\0"
    exports[START_EXPORT](store)
    assert exports["ran"](store) == 1 and memory.read(store, 0, 1) == b"\x09"


@pytest.mark.parametrize("text", [CALCULATOR, STARTED, "(module)", '(module (func (export "f")))'])
def test_instrumenting_twice_changes_nothing(text):
    once = instrument(wasm(text))
    twice = instrument(once.wasm)
    assert twice == once
    assert instrument(twice.wasm).wasm == once.wasm


def test_a_module_needing_no_exports_is_returned_as_is():
    original = wasm('(module (memory (export "x") 0) (func (export "f")))')
    assert instrument(original).wasm != original  # the memory gains its __sidecar_ name
    plain = wasm('(module (global i32 (i32.const 1)) (func (export "f")))')
    assert instrument(plain).wasm == plain


def test_an_export_section_is_created_where_there_was_none():
    result = instrument(wasm('(module $named (memory 1) (global (mut i64) (i64.const 0)) (func))'))
    wasmtime.Module.validate(ENGINE, result.wasm)
    exports = decode(Module.parse(result.wasm)).exports
    assert [e.name for e in exports] == ["__sidecar_memory_0", "__sidecar_global_0"]


@pytest.mark.parametrize(
    ("exports", "message"),
    [
        ('(export "__sidecar_memory_0" (global $g))', "'__sidecar_memory_0'"),
        ('(export "__sidecar_global_0" (global $c))', "'__sidecar_global_0'"),  # index 0 is immutable
        ('(export "__sidecar_global_1" (global $g)) (export "__sidecar_foo" (func $f))', "'__sidecar_foo'"),
        ('(export "__sidecar_start" (func $p))', "start function 1 must take and return nothing"),
        ('(export "__sidecar_start" (global $g))', "'__sidecar_start'"),
    ],
)
def test_foreign_exports_under_our_prefix_are_refused(exports, message):
    text = f"""(module (memory 1) (global $c i32 (i32.const 0)) (global $g (mut i32) (i32.const 0))
        (func $f) (func $p (param i32)) {exports})"""
    with pytest.raises(WasmFormatError, match=message):
        instrument(wasm(text))


def test_a_start_section_with_another_sidecar_start_is_refused():
    text = '(module (func $a) (func $b) (start $a) (export "__sidecar_start" (func $b)))'
    with pytest.raises(WasmFormatError, match="'__sidecar_start'"):
        instrument(wasm(text))


def test_a_start_function_with_parameters_is_refused():
    with pytest.raises(WasmFormatError, match="must take and return nothing"):
        instrument(wasm("(module (func $f (param i32)) (start $f))"))


def test_wizer_outputs_are_ordinary_modules():
    text = """(module (memory 1) (global (mut i32) (i32.const 0))
        (func (export "__wizer_initialize")) (export "__wizer_memory" (memory 0)))"""
    result = instrument(wasm(text))
    assert result.snapshottable
    assert [m.export for m in result.memories] == ["__sidecar_memory_0"]


def test_memory_names_count_imported_memories_but_only_defined_ones_are_exported():
    text = '(module (import "env" "m" (memory 1)) (memory $own 2 3) (memory $big i64 1))'
    result = instrument(wasm(text))
    assert result.memories == (ExportedMemory(1, "__sidecar_memory_1"), ExportedMemory(2, "__sidecar_memory_2"))
    assert (result.memory_minimums, result.memory_maximums, result.memory64) == ((2, 1), (3, None), (False, True))
    assert result.reasons == ("imports a memory (env.m)", "memory 2 is 64-bit")
    wasmtime.Module.validate(ENGINE, result.wasm)


TABLE = '(table $t 2 funcref) (table $u 2 funcref) (elem $e func $f) (func $f)'


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('(import "env" "m" (memory 1))', "imports a memory (env.m)"),
        ('(import "env" "t" (table 1 funcref))', "imports a table (env.t)"),
        ('(import "env" "g" (global (mut i32)))', "imports a mutable global (env.g)"),
        ("(global (mut funcref) (ref.null func))", "mutable global 0 has reference type funcref"),
        (
            "(global i32 (i32.const 0)) (global (mut externref) (ref.null extern))",
            "mutable global 1 has reference type externref",
        ),
        ("(memory i64 1)", "memory 0 is 64-bit"),
        ("(memory 1 1 shared)", "memory 0 is shared"),
        ("(memory 1 (pagesize 1))", "memory 0 has a custom page size"),
        (TABLE + "(func (table.set $t (i32.const 0) (ref.null func)))", "mutates a table (table.set in function 1)"),
        (TABLE + "(func (drop (table.grow $t (ref.null func) (i32.const 1))))", "(table.grow in function 1)"),
        (TABLE + "(func (table.fill $t (i32.const 0) (ref.null func) (i32.const 1)))", "(table.fill in function 1)"),
        (TABLE + "(func (table.copy $t $u (i32.const 0) (i32.const 0) (i32.const 1)))", "(table.copy in function 1)"),
        (TABLE + "(func (table.init $t $e (i32.const 0) (i32.const 0) (i32.const 1)))", "(table.init in function 1)"),
        (TABLE + "(func (elem.drop $e))", "drops an element segment (elem.drop in function 1)"),
        ('(memory 1) (data $d "x") (func (data.drop $d))', "drops a data segment (data.drop in function 0)"),
        (
            '(import "env" "f" (func)) (memory 1) (data $d "x")'
            "(func (data.drop $d)) (func) (func (data.drop $d))",
            "drops a data segment (data.drop in function 1 and 1 more)",
        ),
    ],
)
def test_each_reason_a_module_cannot_be_snapshotted(body, reason):
    result = instrument(wasm(f"(module {body})"))
    assert not result.snapshottable
    assert len(result.reasons) == 1 and reason in result.reasons[0], result.reasons


def test_an_imported_immutable_global_is_fine_and_shifts_the_numbering():
    result = instrument(wasm('(module (import "env" "g" (global i32)) (global (mut i32) (i32.const 0)))'))
    assert result.snapshottable
    assert result.globals == (ExportedGlobal(1, "__sidecar_global_1", "i32"),)


def test_unsnapshottable_modules_still_run(instantiate):
    text = """(module (table $t 1 funcref) (memory 1) (global $g (mut funcref) (ref.null func))
        (func $f (result i32) (i32.const 7)) (elem declare func $f)
        (func (export "go") (result i32)
          (table.set $t (i32.const 0) (ref.func $f))
          (drop (memory.grow (i32.const 1)))
          (call_indirect (result i32) (i32.const 0))))"""
    result = instrument(wasm(text))
    assert not result.snapshottable and result.grows_memory
    store, exports = instantiate(result.wasm)
    assert exports["go"](store) == 7
    assert isinstance(exports["__sidecar_global_0"], wasmtime.Global)


def test_memory_grow_is_noted():
    assert instrument(wasm("(module (memory 1) (func (drop (memory.grow (i32.const 1)))))")).grows_memory
