"""sidecar.wasmffi.native: our C extension, driven by real guests without the sidecar.

The end-to-end behaviour (errors on the wire, budgets named, timeouts) is in test_vm_calls,
test_vm_budgets and test_vm_safety; here is what the C host functions themselves do with
pointers, lengths, budgets and misuse, who keeps a GuestIo (and an isolate's store) alive, that
the epoch ticker interrupts guests, and the check that refuses a stale build.
"""

from __future__ import annotations

import gc
import hashlib
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wasmtime

from sidecar.engines import Engines, EngineSettings
from sidecar.guest_abi import SIGNATURES, CallState
from sidecar.hostcalls import HostCalls
from sidecar.isolate import Isolate
from sidecar.limits import load_limits
from sidecar.modules import ModuleStore
from sidecar.runtime import NotReading, Runtime
from sidecar.wasmffi import (
    FastCall,
    MemorySlot,
    _native,
    define_native_func,
    instance_export,
    live_deadline_callbacks,
    trap_message,
)
from sidecar.wasmffi.capi import address
from sidecar.wasmffi.native import CALLBACKS, EpochTicker, GuestIo, check_build, host_of, store_for

WAIT = 10.0  # seconds: the ceiling on any wait, never an expected duration

GUEST = """
(module
  (import "sidecar" "input_len" (func $input_len (result i32)))
  (import "sidecar" "input_read" (func $input_read (param i32)))
  (import "sidecar" "output_write" (func $output_write (param i32 i32)))
  (import "sidecar" "response_len" (func $response_len (result i32)))
  (import "sidecar" "response_read" (func $response_read (param i32)))
  (memory (export "memory") 1)
  (func (export "echo") (result i32)
    (call $input_read (i32.const 1024))
    (call $output_write (i32.const 1024) (call $input_len))
    (call $input_len))
  (func (export "echo_response") (result i32)
    (call $response_read (i32.const 2048))
    (call $output_write (i32.const 2048) (call $response_len))
    (call $response_len))
  (func (export "input_size") (result i32) (call $input_len))
  (func (export "response_size") (result i32) (call $response_len))
  (func (export "read_to") (param i32) (call $input_read (local.get 0)))
  (func (export "write") (param i32 i32) (call $output_write (local.get 0) (local.get 1))))
"""


class Guest:
    def __init__(self, bind: bool) -> None:
        self.io = GuestIo()
        self.store = store_for(wasmtime.Engine(), self.io)
        linker = wasmtime.Linker(self.store.engine)
        for name, callback in CALLBACKS.items():
            params, results = SIGNATURES[name]
            define_native_func(linker, "sidecar", name, params, results, callback)
        instance = linker.instantiate(self.store, wasmtime.Module(self.store.engine, GUEST))
        if bind:
            memory = instance_export(self.store, instance, "memory")
            assert isinstance(memory, wasmtime.Memory)
            slot = MemorySlot().bind(self.store, memory)
            self.io.bind(slot.context, slot.handle)
        self.calls = {name: FastCall(self.store, instance_export(self.store, instance, name), name=name)
                      for name in ("echo", "echo_response", "input_size", "response_size", "read_to", "write")}

    def call(self, export: str, *args: int, input: bytes = b"", cap: int = 1 << 20, response: bytes = b"") -> list:
        self.io.begin(input, cap, response)
        return self.calls[export](list(args))


@pytest.fixture(params=[True, False], ids=["bound", "by-name"])
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    made = Guest(bind=request.param)
    yield made
    made.store.close()


def test_input_goes_in_and_output_comes_back(guest: Guest) -> None:
    assert guest.call("echo", input=b"hello \x00 world") == [13]
    assert guest.io.output() == b"hello \x00 world"
    assert guest.call("echo", input=b"") == [0] and guest.io.output() == b""  # begin forgets the last output


def test_empty_ranges_are_fine_up_to_the_end_of_memory(guest: Guest) -> None:
    guest.call("write", 0, 0)  # nothing written yet, nothing to write
    guest.calls["write"]([65536, 0])
    guest.calls["read_to"]([65536])  # an empty input fits at the very end
    assert guest.io.output() == b""
    with pytest.raises(wasmtime.WasmtimeError, match=r"\[65537, \+0\)"):
        guest.calls["write"]([65537, 0])


def test_response_is_what_response_read_gives(guest: Guest) -> None:
    assert guest.call("echo_response", response=b'{"v":1}') == [7]
    assert guest.io.output() == b'{"v":1}'
    guest.io.response = b"[]"  # a host answer arriving during a call replaces it
    assert guest.io.response == b"[]"


def test_lengths_an_i32_cannot_tell_are_refused(guest: Guest) -> None:
    longest, too_long = bytes(2**31 - 1), bytes(2**31)  # calloc'd: address space, not memory
    assert guest.call("input_size", input=longest) == [2**31 - 1]
    assert guest.call("response_size", response=longest) == [2**31 - 1]
    with pytest.raises(ValueError, match="input of 2147483648 bytes is longer than the guest ABI's i32"):
        guest.io.begin(too_long, 0, b"")
    with pytest.raises(ValueError, match="response of 2147483648 bytes"):
        guest.io.begin(b"", 0, too_long)
    with pytest.raises(ValueError, match="response of 2147483648 bytes"):
        guest.io.response = too_long
    assert guest.calls["response_size"]([]) == [2**31 - 1]  # what was refused changed nothing


# A host function's trap reaches Python as a WasmtimeError carrying its message (see test_hostfunc).


def test_output_grows_up_to_the_cap_and_one_byte_more_traps(guest: Guest) -> None:
    guest.call("write", 0, 65536, cap=3 * 65536)
    guest.calls["write"]([0, 65536])  # same call state: appends
    guest.calls["write"]([0, 65536])
    assert guest.io.output() == bytes(3 * 65536)
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        guest.calls["write"]([0, 1])
    assert f"vm_output_bytes exceeded: {3 * 65536 + 1} > {3 * 65536}" in trap_message(caught.value)
    assert guest.io.output_overflow == 3 * 65536 + 1 and guest.io.fault is None


@pytest.mark.parametrize(
    ("export", "args", "message"),
    [
        ("read_to", [65535], "guest range [65535, +5) is outside its memory of 65536 bytes"),
        ("read_to", [-1], "guest range [4294967295, +5) is outside its memory of 65536 bytes"),
        ("write", [65530, 7], "guest range [65530, +7) is outside its memory of 65536 bytes"),
        ("write", [0, -1], "guest range [0, +-1) is outside its memory of 65536 bytes"),
    ],
)
def test_a_range_outside_memory_traps_and_is_remembered(guest: Guest, export: str, args: list[int],
                                                          message: str) -> None:
    with pytest.raises(wasmtime.WasmtimeError) as caught:
        guest.call(export, *args, input=b"12345")
    assert message in str(caught.value)
    assert guest.io.fault == ("memory_out_of_bounds", message) and guest.io.output_overflow == 0
    assert guest.call("echo", input=b"after") == [5] and guest.io.fault is None  # the store is still usable


def reader(memory: str) -> tuple[wasmtime.Store, GuestIo, FastCall]:
    """A guest whose `f` calls `input_read(0)`, with `memory` its memory declaration."""
    io = GuestIo()
    store = store_for(wasmtime.Engine(), io)
    linker = wasmtime.Linker(store.engine)
    define_native_func(linker, "sidecar", "input_read", ("i32",), (), CALLBACKS["input_read"])
    text = f"""(module (import "sidecar" "input_read" (func $r (param i32)))
                 {memory} (func (export "f") (call $r (i32.const 0))))"""
    instance = linker.instantiate(store, wasmtime.Module(store.engine, text))
    return store, io, FastCall(store, instance_export(store, instance, "f"))


def test_a_memory_of_zero_bytes_takes_nothing_and_refuses_the_rest() -> None:
    store, io, read = reader('(memory (export "memory") 0)')
    try:
        io.begin(b"", 0, b"")
        assert read([]) == []
        io.begin(b"x", 0, b"")
        with pytest.raises(wasmtime.WasmtimeError, match=r"\[0, \+1\) is outside its memory of 0 bytes"):
            read([])
    finally:
        store.close()


def test_without_a_memory_export_the_guest_traps_as_an_abi_violation() -> None:
    store, io, read = reader("(memory 1)")
    try:
        with pytest.raises(wasmtime.WasmtimeError, match="exports no memory named `memory`"):
            read([])
        assert io.fault is not None and io.fault[0] == "abi_violation"
    finally:
        store.close()


def test_misuse_is_a_python_error() -> None:
    io = GuestIo()
    with pytest.raises(TypeError):
        GuestIo(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="input must be bytes"):
        io.begin("text", 10, b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="response must be bytes"):
        io.begin(b"", 10, bytearray())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output_cap"):
        io.begin(b"", -1, b"")
    with pytest.raises(TypeError, match="3 arguments"):
        io.begin(b"", 1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="response must be bytes"):
        io.response = "text"  # type: ignore[assignment]
    with pytest.raises(AttributeError):
        del io.response
    with pytest.raises(ValueError, match="both"):
        io.bind(1, 0)
    with pytest.raises(TypeError, match="context must be an int"):  # reported at once, the rest never read
        io.bind("1", 2**80)  # type: ignore[arg-type]
    with pytest.raises(OverflowError, match="memory is not an address"):
        io.bind(1, -1)
    with pytest.raises(OverflowError, match="context is not an address"):
        io.bind(2**64, 1)
    with pytest.raises(TypeError, match="2 arguments"):
        io.bind(1, 1, None)  # type: ignore[call-arg]
    io.bind(0, 0)  # unbinding is fine: back to the lookup by name
    assert io.output() == b"" and io.fault is None and io.output_overflow == 0


@pytest.mark.parametrize(
    ("first", "memory_bytes", "error", "message"),
    [
        (-1, 24, OverflowError, "a wasmtime function is not an address"),
        ("1", 24, TypeError, "a wasmtime function must be an int"),
        (0, 24, ValueError, "address is 0"),
        (1, -24, RuntimeError, "layout is not the one"),  # "K" would have made it a huge size
    ],
)
def test_setup_refuses_what_is_not_an_address_or_a_size(first: object, memory_bytes: int, error: type,
                                                        message: str) -> None:
    with pytest.raises(error, match=message):  # refused before anything is set: the module still works
        _native.setup(first, 1, 1, 1, 1, 1, 1, 16, 8, 2, 16, memory_bytes)


def test_a_guest_io_that_only_its_store_holds_lives_as_long_as_the_store() -> None:
    guest = Guest(bind=True)
    io = weakref.ref(guest.io)
    del guest.io  # the store is all that holds it now
    gc.collect()
    assert io() is not None
    io().begin(b"still here", 1 << 10, b"")  # type: ignore[union-attr]
    assert guest.calls["echo"]([]) == [10] and io().output() == b"still here"  # type: ignore[union-attr]
    guest.store.close()  # the store's data goes, and with it the last reference
    assert io() is None


def test_a_store_gives_its_reference_back_exactly_once_and_a_linker_holds_none() -> None:
    io = GuestIo()
    baseline = sys.getrefcount(io)
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    define_native_func(linker, "sidecar", "input_len", (), ("i32",), CALLBACKS["input_len"])
    assert sys.getrefcount(io) == baseline
    store = store_for(engine, io)
    assert sys.getrefcount(io) == baseline + 1
    module = wasmtime.Module(engine, '(module (import "sidecar" "input_len" (func (result i32))))')
    linker.instantiate(store, module)
    store.close()
    store.close()
    assert sys.getrefcount(io) == baseline
    linker.instantiate(store_for(engine, io), module)  # the linker lives on, usable by another store
    gc.collect()
    assert sys.getrefcount(io) == baseline


def test_a_store_not_made_for_a_guest_io_traps_its_caller_instead_of_crashing() -> None:
    store = wasmtime.Store(wasmtime.Engine())
    linker = wasmtime.Linker(store.engine)
    define_native_func(linker, "sidecar", "input_len", (), ("i32",), CALLBACKS["input_len"])
    text = '(module (import "sidecar" "input_len" (func $l (result i32))) (func (export "f") (result i32) call $l))'
    instance = linker.instantiate(store, wasmtime.Module(store.engine, text))
    with pytest.raises(wasmtime.WasmtimeError, match="no guest ABI state"):
        FastCall(store, instance_export(store, instance, "f"))([])
    store.close()


def test_host_of_is_the_guest_io_host_of_the_callers_store() -> None:
    io, owner = GuestIo(), GuestIo()  # any object with weak references will do as the host
    assert io.host is None
    io.host = weakref.ref(owner)
    with pytest.raises(AttributeError):
        del io.host
    with pytest.raises(ValueError, match="caller address is 0"):
        host_of(0)
    with pytest.raises(TypeError, match="caller must be an int"):
        host_of("1")


ISOLATE_GUEST = """
(module
  (import "sidecar" "input_len" (func $input_len (result i32)))
  (import "sidecar" "host_call" (func $host_call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "size") (result i32) (call $input_len)))
"""


@pytest.fixture
def new_isolate(tmp_path: Path) -> Iterator[Callable[[], Isolate]]:
    """Makes isolates of ISOLATE_GUEST, with both kinds of host function, outside any VM."""
    limits = load_limits({})
    with Engines(limits) as engines:
        compiled = ModuleStore(limits, engines, tmp_path).load(wasmtime.wat2wasm(ISOLATE_GUEST),
                                                               EngineSettings.from_limits(limits))

        def unused(*args: object) -> None:
            raise AssertionError("no host interaction expected")

        runtime = Runtime(HostCalls(limits, unused), NotReading(), unused)
        yield lambda: Isolate("vm-1", compiled, limits, runtime, unused)


def test_an_isolate_dropped_without_close_frees_its_store(new_isolate: Callable[[], Isolate]) -> None:
    baseline = live_deadline_callbacks()
    isolate = new_isolate()
    state = CallState(input=b"abc", deadline=time.monotonic() + WAIT)
    assert isolate.call("size", [], state, 1000) == [3]
    store, io = isolate.store, weakref.ref(isolate.abi.io)
    assert live_deadline_callbacks() == baseline + 1
    del isolate
    gc.collect()
    with pytest.raises(ValueError, match="closed"):  # closed although `store` still refers to it
        store.set_epoch_deadline(1)
    assert live_deadline_callbacks() == baseline and io() is None


def test_closing_an_isolate_twice_is_fine(new_isolate: Callable[[], Isolate]) -> None:
    isolate = new_isolate()
    isolate.close()
    isolate.close()
    with pytest.raises(ValueError, match="closed"):
        isolate.store.set_epoch_deadline(1)


def spin_until_interrupted(engine: wasmtime.Engine) -> bool:
    """Run a guest that loops forever with an epoch deadline one tick away; True if it was
    interrupted by whatever ticks `engine`, False if only the watchdog (after WAIT) stopped it."""
    store = wasmtime.Store(engine)
    spin = wasmtime.Instance(store, wasmtime.Module(engine, '(module (func (export "spin") (loop (br 0))))'), [])
    finished, fired = threading.Event(), threading.Event()

    def watchdog() -> None:
        if not finished.wait(WAIT):
            fired.set()
            for _ in range(10):
                engine.increment_epoch()

    guard = threading.Thread(target=watchdog)
    guard.start()
    store.set_epoch_deadline(1)
    try:
        with pytest.raises(wasmtime.Trap) as caught:
            FastCall(store, spin.exports(store)["spin"])([])
        return caught.value.trap_code == wasmtime.TrapCode.INTERRUPT and not fired.is_set()
    finally:
        finished.set()
        guard.join()
        store.close()


def epoch_engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = True
    return wasmtime.Engine(config)


def test_the_ticker_interrupts_guests_of_every_engine_it_ticks() -> None:
    first, second = epoch_engine(), epoch_engine()
    ticker = EpochTicker(1)
    ticker.add(address(first.ptr()), first)
    assert not ticker.running
    ticker.start()
    ticker.start()  # idempotent
    try:
        assert ticker.running
        assert spin_until_interrupted(first)
        ticker.add(address(second.ptr()), second)  # added while it ticks
        assert spin_until_interrupted(second)
    finally:
        ticker.stop()
    ticker.stop()  # idempotent
    assert not ticker.running
    ticker.start()  # and it starts again
    try:
        assert spin_until_interrupted(first)
    finally:
        ticker.stop()



def runs_untouched(engine: wasmtime.Engine, ms: float) -> bool:
    """Run a guest for `ms` with an epoch deadline one tick away; True if no tick interrupted it."""
    store = wasmtime.Store(engine)
    until = time.monotonic() + ms / 1000
    more = wasmtime.Func(store, wasmtime.FuncType([], [wasmtime.ValType.i32()]), lambda: int(time.monotonic() < until))
    module = wasmtime.Module(engine, '(module (import "" "more" (func $more (result i32)))'
                                     ' (func (export "run") (loop (br_if 0 (call $more)))))')
    instance = wasmtime.Instance(store, module, [more])
    store.set_epoch_deadline(1)
    try:
        instance.exports(store)["run"](store)
        return True
    except wasmtime.Trap:
        return False
    finally:
        store.close()


class Owner:
    """Whatever keeps a ticked engine alive."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self.engine = engine


def test_a_removed_engine_is_no_longer_ticked_and_its_owner_is_released() -> None:
    kept, dropped = epoch_engine(), epoch_engine()
    owner = Owner(dropped)
    released = weakref.ref(owner)
    ticker = EpochTicker(1)
    ticker.add(address(kept.ptr()), kept)
    ticker.add(address(dropped.ptr()), owner)
    del owner
    ticker.start()
    try:
        assert not runs_untouched(dropped, 50)  # ticked: 50 ticks' time holds a tick for sure
        assert ticker.remove(address(dropped.ptr())) is True
        assert released() is None
        assert runs_untouched(dropped, 20)  # 20 ticks' time, and none reached it
        assert spin_until_interrupted(kept)  # the others tick on
        assert ticker.remove(address(dropped.ptr())) is False
    finally:
        ticker.stop()

def test_ticker_misuse_is_a_python_error() -> None:
    with pytest.raises(ValueError, match="tick_ms"):
        EpochTicker(0)
    with pytest.raises(TypeError):
        EpochTicker("1")  # type: ignore[arg-type]
    ticker = EpochTicker(1)
    with pytest.raises(ValueError, match="0"):
        ticker.add(0, None)
    with pytest.raises(TypeError, match="2 arguments"):
        ticker.add(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ticker.remove("1")  # type: ignore[arg-type]
    assert ticker.remove(0) is False


def test_a_build_that_does_not_match_its_source_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "_native.c"
    check_build(source, "anything")  # no source beside it (an installed wheel): nothing to compare
    source.write_bytes(b"int x;\n")
    check_build(source, hashlib.sha256(b"int x;\n").hexdigest())
    with pytest.raises(ImportError, match="pip install -e"):
        check_build(source, hashlib.sha256(b"int y;\n").hexdigest())
