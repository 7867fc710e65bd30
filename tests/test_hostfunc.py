"""Host functions through our own trampoline: faults trap only their caller, never the process."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import wasmtime

from sidecar.wasmffi import FastCall, GuestFault, MemorySlot, define_host_func, trap_message

from .support import WAIT

GUEST = """(module
  (import "sidecar" "double" (func $double (param i32) (result i32)))
  (import "sidecar" "peek" (func $peek (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 8) "\\2a")
  (func (export "twice") (param i32) (result i32) (call $double (local.get 0)))
  (func (export "peek") (param i32) (result i32) (call $peek (local.get 0))))"""


def double(memory, args):  # type: ignore[no-untyped-def]
    if args[0] < 0:
        raise GuestFault("negative input", "abi_violation")
    return [args[0] * 2]


def peek(memory, args):  # type: ignore[no-untyped-def]
    return [memory.read(args[0], 1)[0]]


def linked(wat: str, define: Callable[[wasmtime.Linker], object], engine: wasmtime.Engine | None = None) -> Any:
    """(store, exports) of `wat` instantiated against the host functions `define` puts in a linker."""
    engine = engine or wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    define(linker)
    store = wasmtime.Store(engine)
    return store, linker.instantiate(store, wasmtime.Module(engine, wat)).exports(store)


def define_guest_abi(linker: wasmtime.Linker, **on_fault: Callable[[GuestFault], object]) -> None:
    """`double` and `peek` for GUEST; `on_fault` by function name."""
    define_host_func(linker, "sidecar", "double", ["i32"], ["i32"], double, on_fault=on_fault.get("double"))
    define_host_func(linker, "sidecar", "peek", ["i32"], ["i32"], peek, on_fault=on_fault.get("peek"))


def instance(engine: wasmtime.Engine) -> tuple[wasmtime.Store, FastCall, FastCall]:
    store, exports = linked(GUEST, define_guest_abi, engine)
    return store, FastCall(store, exports["twice"]), FastCall(store, exports["peek"])


def test_results_and_memory_reads() -> None:
    store, twice, peek_at = instance(wasmtime.Engine())
    assert twice([21]) == [42]
    assert peek_at([8]) == [42]
    store.close()


@pytest.mark.parametrize(("call", "arg", "message"), [
    ("twice", -1, "negative input"),
    ("peek", 65536, "outside its memory of 65536 bytes"),
    ("peek", -1, "guest range [4294967295, +1)"),
])  # fmt: skip
def test_a_fault_traps_that_call_and_the_instance_serves_on(call: str, arg: int, message: str) -> None:
    store, twice, peek_at = instance(wasmtime.Engine())
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        (twice if call == "twice" else peek_at)([arg])
    assert message in trap_message(caught.value)
    assert twice([5]) == [10]
    store.close()


def test_faults_on_one_thread_never_surface_in_another() -> None:
    """wasmtime-py's own route shares one exception slot between threads; ours shares nothing."""
    engine = wasmtime.Engine()
    errors: list[BaseException] = []

    def hammer(faulty: bool) -> None:
        store, twice, _ = instance(engine)
        try:
            for _ in range(2000):
                if faulty:
                    with pytest.raises(wasmtime.WasmtimeError):
                        twice([-1])
                else:
                    assert twice([3]) == [6]
        except BaseException as exc:  # collected and re-raised by the test thread
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=hammer, args=(index % 2 == 0,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not errors


def test_host_functions_on_many_engines_never_abort() -> None:
    """A function type shared across engines aborts the process: run it where that would show."""
    code = (
        "import wasmtime\n"
        "from tests.test_hostfunc import instance\n"
        "for _ in range(3):\n"
        "    store, twice, _ = instance(wasmtime.Engine())\n"
        "    assert twice([2]) == [4]\n"
        "    store.close()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-1000:]


GROWING = """(module
  (import "sidecar" "peek" (func $peek (param i32) (result i32)))
  (import "sidecar" "wide" (func $wide (param i64 i32) (result i64)))
  (memory (export "memory") 1)
  (func (export "grow_and_poke") (param i32)
    (drop (memory.grow (i32.const 1)))
    (i32.store8 (local.get 0) (i32.const 7)))
  (func (export "peek") (param i32) (result i32) (call $peek (local.get 0)))
  (func (export "wide") (param i64 i32) (result i64) (call $wide (local.get 0) (local.get 1))))"""


def test_a_bound_memory_slot_follows_growth() -> None:
    """The slot path locates memory on every call: bytes past the first page appear once grown."""
    slot = MemorySlot()

    def define(linker: wasmtime.Linker) -> None:
        define_host_func(linker, "sidecar", "peek", ["i32"], ["i32"], peek, slot)
        define_host_func(linker, "sidecar", "wide", ["i64", "i32"], ["i64"], lambda memory, args: [args[0] - args[1]])

    store, exports = linked(GROWING, define)
    slot.bind(store, exports["memory"])
    peek_at, grow = FastCall(store, exports["peek"]), FastCall(store, exports["grow_and_poke"])
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        peek_at([70_000])
    assert "outside its memory of 65536 bytes" in trap_message(caught.value)
    assert slot.data_size() == 65536
    grow([70_000])
    assert peek_at([70_000]) == [7]
    assert slot.data_size() == 2 * 65536
    assert FastCall(store, exports["wide"])([2**40, 1]) == [2**40 - 1]  # i64 both ways, beside an i32
    store.close()
    with pytest.raises(ValueError, match="closed"):
        slot.data_size()  # the context is freed memory now: refused, never read


def test_bound_methods_are_held_without_keeping_their_object_alive() -> None:
    class Owner:  # in the sidecar, the guest ABI of an isolate, which owns the store
        def __init__(self) -> None:
            self.faults: list[str] = []

        def double(self, memory: object, args: list[int]) -> list[int]:
            return double(memory, args)

        def on_fault(self, fault: GuestFault) -> None:
            self.faults.append(str(fault))

    owner, engine = Owner(), wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    define_host_func(linker, "sidecar", "double", ["i32"], ["i32"], owner.double, on_fault=owner.on_fault)
    define_host_func(linker, "sidecar", "peek", ["i32"], ["i32"], peek)
    store = wasmtime.Store(engine)
    exports = linker.instantiate(store, wasmtime.Module(engine, GUEST)).exports(store)
    twice = FastCall(store, exports["twice"])
    assert twice([2]) == [4]
    with pytest.raises(wasmtime.WasmtimeError):
        twice([-1])
    assert owner.faults == ["negative input"]
    gone = weakref.ref(owner)
    del owner
    gc.collect()
    assert gone() is None
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        twice([2])
    assert "the host function's owner is gone" in trap_message(caught.value)
    store.close()


def test_a_guest_without_memory_traps_when_a_host_function_needs_it() -> None:
    guest = (
        '(module (import "sidecar" "peek" (func $p (param i32) (result i32)))'
        ' (func (export "f") (result i32) (call $p (i32.const 0))))'
    )
    store, exports = linked(guest, lambda linker: define_host_func(linker, "sidecar", "peek", ["i32"], ["i32"], peek))
    call = FastCall(store, exports["f"])
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        call([])
    assert "exports no memory named `memory`" in trap_message(caught.value)
    store.close()


def test_a_host_function_returning_the_wrong_results_traps_with_a_generic_message() -> None:
    def define(linker: wasmtime.Linker) -> None:
        define_host_func(linker, "sidecar", "double", ["i32"], ["i32"], lambda memory, args: [])
        define_host_func(linker, "sidecar", "peek", ["i32"], ["i32"], peek)

    store, exports = linked(GUEST, define)
    call = FastCall(store, exports["twice"])
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        call([1])
    assert "sidecar host function failed" in trap_message(caught.value)
    store.close()


def test_on_fault_hears_each_fault_before_the_trap_and_cannot_break_it() -> None:
    heard: list[GuestFault] = []
    faults = {"double": heard.append, "peek": lambda fault: 1 / 0}  # peek's hook raises
    store, exports = linked(GUEST, lambda linker: define_guest_abi(linker, **faults))
    twice, peek_at = FastCall(store, exports["twice"]), FastCall(store, exports["peek"])
    assert twice([4]) == [8] and not heard
    with pytest.raises(wasmtime.WasmtimeError):
        twice([-1])
    assert [(fault.code, str(fault)) for fault in heard] == [("abi_violation", "negative input")]
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        peek_at([1 << 20])  # its on_fault raises: the guest still traps with the fault's own message
    assert "outside its memory" in trap_message(caught.value)
    store.close()
