"""Host functions through our own trampoline (`define_store_func`, the guest ABI's path): faults
trap only their caller, never the process, and each call reaches its own store's host."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence

import pytest
import wasmtime

from sidecar.wasmffi import FastCall, GuestFault, GuestMemory, MemorySlot, define_store_func, trap_message
from sidecar.wasmffi.native import GuestIo, store_for

from .support import WAIT

GUEST = """(module
  (import "sidecar" "double" (func $double (param i32) (result i32)))
  (import "sidecar" "peek" (func $peek (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 8) "\\2a")
  (func (export "twice") (param i32) (result i32) (call $double (local.get 0)))
  (func (export "peek") (param i32) (result i32) (call $peek (local.get 0))))"""


class Host:
    """A store's host, as the guest ABI's `GuestAbi` is: the store's `GuestIo` refers to it weakly."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self.memory = MemorySlot()  # unbound: the trampoline looks the memory up by name
        self.faults: list[GuestFault] = []
        self.io = GuestIo()
        self.io.host = weakref.ref(self)
        self.store = store_for(engine, self.io)

    def double(self, memory: GuestMemory, args: Sequence[int]) -> list[int]:
        if args[0] < 0:
            raise GuestFault("negative input", "abi_violation")
        return [args[0] * 2]

    def peek(self, memory: GuestMemory, args: Sequence[int]) -> list[int]:
        return [memory.read(args[0], 1)[0]]

    def on_fault(self, fault: GuestFault) -> None:
        self.faults.append(fault)


def guest_abi(engine: wasmtime.Engine, double=Host.double) -> wasmtime.Linker:  # type: ignore[no-untyped-def]
    """One linker with `double` and `peek` for GUEST, to serve every store of `engine`."""
    linker = wasmtime.Linker(engine)
    define_store_func(linker, "sidecar", "double", ["i32"], ["i32"], double)
    define_store_func(linker, "sidecar", "peek", ["i32"], ["i32"], Host.peek)
    return linker


def exports_of(host: Host, linker: wasmtime.Linker, wat: str = GUEST) -> wasmtime.InstanceExports:
    return linker.instantiate(host.store, wasmtime.Module(linker.engine, wat)).exports(host.store)


def instance(linker: wasmtime.Linker, host: Host | None = None) -> tuple[Host, FastCall, FastCall]:
    """(host, twice, peek) of a GUEST instance in a store of its own, linked by `linker`."""
    host = host or Host(linker.engine)
    exports = exports_of(host, linker)
    return host, FastCall(host.store, exports["twice"]), FastCall(host.store, exports["peek"])


def test_results_and_memory_reads() -> None:
    host, twice, peek_at = instance(guest_abi(wasmtime.Engine()))
    assert twice([21]) == [42]
    assert peek_at([8]) == [42]
    host.store.close()


@pytest.mark.parametrize(("call", "arg", "message"), [
    ("twice", -1, "negative input"),
    ("peek", 65536, "outside its memory of 65536 bytes"),
    ("peek", -1, "guest range [4294967295, +1)"),
])  # fmt: skip
def test_a_fault_traps_that_call_and_the_instance_serves_on(call: str, arg: int, message: str) -> None:
    host, twice, peek_at = instance(guest_abi(wasmtime.Engine()))
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        (twice if call == "twice" else peek_at)([arg])
    assert message in trap_message(caught.value)
    assert twice([5]) == [10]
    host.store.close()


def test_faults_on_one_thread_never_surface_in_another() -> None:
    """wasmtime-py's own route shares one exception slot between threads; ours shares nothing,
    even with every instance linked by one linker, as the VMs of one module are."""
    linker = guest_abi(wasmtime.Engine())
    errors: list[BaseException] = []
    faults: dict[bool, list[int]] = {True: [], False: []}

    def hammer(faulty: bool) -> None:
        host, twice, _ = instance(linker)
        try:
            for _ in range(2000):
                if faulty:
                    with pytest.raises(wasmtime.WasmtimeError):
                        twice([-1])
                else:
                    assert twice([3]) == [6]
            faults[faulty].append(len(host.faults))
        except BaseException as exc:  # collected and re-raised by the test thread
            errors.append(exc)
        finally:
            host.store.close()

    threads = [threading.Thread(target=hammer, args=(index % 2 == 0,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not errors
    assert faults == {True: [2000, 2000], False: [0, 0]}  # each fault told to its own store's host only


def test_host_functions_on_many_engines_never_abort() -> None:
    """A function type shared across engines aborts the process: run it where that would show."""
    code = (
        "import wasmtime\n"
        "from tests.test_hostfunc import guest_abi, instance\n"
        "for _ in range(3):\n"
        "    host, twice, _ = instance(guest_abi(wasmtime.Engine()))\n"
        "    assert twice([2]) == [4]\n"
        "    host.store.close()\n"
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
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    define_store_func(linker, "sidecar", "peek", ["i32"], ["i32"], Host.peek)
    define_store_func(linker, "sidecar", "wide", ["i64", "i32"], ["i64"],
                      lambda host, memory, args: [args[0] - args[1]])
    host = Host(engine)
    exports = exports_of(host, linker, GROWING)
    slot = host.memory.bind(host.store, exports["memory"])
    peek_at, grow = FastCall(host.store, exports["peek"]), FastCall(host.store, exports["grow_and_poke"])
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        peek_at([70_000])
    assert "outside its memory of 65536 bytes" in trap_message(caught.value)
    assert slot.data_size() == 65536
    grow([70_000])
    assert peek_at([70_000]) == [7]
    assert slot.data_size() == 2 * 65536
    assert FastCall(host.store, exports["wide"])([2**40, 1]) == [2**40 - 1]  # i64 both ways, beside an i32
    host.store.close()
    with pytest.raises(ValueError, match="closed"):
        slot.data_size()  # the context is freed memory now: refused, never read


def test_neither_the_linker_nor_the_store_keeps_the_host_alive() -> None:
    """The host (in the sidecar, an instance's `GuestAbi`) owns its store; once it is gone, a call
    in that store traps, as it does in a store that never had one."""
    engine = wasmtime.Engine()
    linker = guest_abi(engine)
    host, twice, _ = instance(linker)
    assert twice([2]) == [4]
    store, gone = host.store, weakref.ref(host)
    del host
    gc.collect()
    assert gone() is None
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        twice([2])
    assert "this store has no host for its host functions" in trap_message(caught.value)
    store.close()
    bare = wasmtime.Store(engine)  # no GuestIo at all
    exports = linker.instantiate(bare, wasmtime.Module(engine, GUEST)).exports(bare)
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        FastCall(bare, exports["twice"])([2])
    assert "this store has no host for its host functions" in trap_message(caught.value)
    bare.close()


def test_a_guest_without_memory_traps_when_a_host_function_needs_it() -> None:
    guest = (
        '(module (import "sidecar" "peek" (func $p (param i32) (result i32)))'
        ' (func (export "f") (result i32) (call $p (i32.const 0))))'
    )
    host = Host(wasmtime.Engine())
    call = FastCall(host.store, exports_of(host, guest_abi(host.store.engine), guest)["f"])
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        call([])
    assert "exports no memory named `memory`" in trap_message(caught.value)
    assert [fault.code for fault in host.faults] == ["abi_violation"]
    host.store.close()


def test_a_host_function_returning_the_wrong_results_traps_with_a_generic_message() -> None:
    host, twice, _ = instance(guest_abi(wasmtime.Engine(), double=lambda host, memory, args: []))
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        twice([1])
    assert "sidecar host function failed" in trap_message(caught.value)
    assert not host.faults  # a bug in the sidecar, not the guest's fault
    host.store.close()


class DeafHost(Host):
    def on_fault(self, fault: GuestFault) -> None:
        raise ZeroDivisionError


def test_on_fault_hears_each_fault_before_the_trap_and_cannot_break_it() -> None:
    linker = guest_abi(wasmtime.Engine())
    host, twice, _ = instance(linker)
    assert twice([4]) == [8] and not host.faults
    with pytest.raises(wasmtime.WasmtimeError):
        twice([-1])
    assert [(fault.code, str(fault)) for fault in host.faults] == [("abi_violation", "negative input")]
    deaf, _, peek_at = instance(linker, DeafHost(linker.engine))
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        peek_at([1 << 20])  # its on_fault raises: the guest still traps with the fault's own message
    assert "outside its memory" in trap_message(caught.value)
    host.store.close()
    deaf.store.close()
