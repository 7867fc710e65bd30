"""sidecar.wasmffi: the wrappers over wasmtime's C API, exercised with real guests.

Threads are sequenced with events; the only timed assertion is the bounded cancel latency.
Anything that could abort the process on a regression (an object used with the wrong store)
runs in a subprocess. Every store is closed explicitly.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from sidecar.wasmffi import (
    EpochDeadline,
    FastCall,
    enable_pooling,
    instance_export,
    live_deadline_callbacks,
    set_deadline_callback,
    set_wasi_stdin_bytes,
    store_id,
    trap_message,
    value_type_names,
)

WAIT = 10.0  # seconds: the ceiling on any wait, never an expected duration
CANCEL_LATENCY = 0.1  # seconds: "within a few ms" (typically 1-3 ms), with room for a loaded CI box
REPO = Path(__file__).resolve().parents[1]

GUEST = """
(module
  (import "host" "reenter" (func $reenter (param i32) (result i32)))
  (import "host" "fail" (func $fail))
  (func (export "spin") (loop $l (br $l)))
  (func (export "ok") (result i32) (i32.const 7))
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "id32") (param i32) (result i32) (local.get 0))
  (func (export "id64") (param i64) (result i64) (local.get 0))
  (func (export "idf32") (param f32) (result f32) (local.get 0))
  (func (export "idf64") (param f64) (result f64) (local.get 0))
  (func (export "nop"))
  (func (export "mix") (param i64 f32 f64 i32) (result f64 i32 i64 f32)
    (local.get 2) (local.get 3) (local.get 0) (local.get 1))
  (func (export "boom") (unreachable))
  (func (export "div") (param i32 i32) (result i32) (i32.div_s (local.get 0) (local.get 1)))
  (func (export "call_fail") (call $fail))
  ;; sum(n) = n + reenter(n - 1), where the host's reenter calls sum again through the same FastCall
  (func (export "sum") (param $n i32) (result i32)
    (if (result i32) (i32.eqz (local.get $n))
      (then (i32.const 0))
      (else (i32.add (local.get $n) (call $reenter (i32.sub (local.get $n) (i32.const 1)))))))
  (func (export "v128_param") (param v128))
  (func (export "ref_result") (result externref) (ref.null extern))
  (type $struct (struct))
  (func (export "exotic") (param i32 v128 externref funcref anyref exnref (ref null $struct) f32) (result f64 i64)
    (f64.const 0) (i64.const 0)))
"""

ECHO = """
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  ;; 0: read iovec, 8: nread, 16: write iovec, 24: nwritten, 64..: a 4 KiB buffer
  (func (export "_start") (local $n i32) (local $p i32)
    (loop $more
      (i32.store (i32.const 0) (i32.const 64))
      (i32.store (i32.const 4) (i32.const 4096))
      (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
        (then (call $proc_exit (i32.const 2))))
      (local.set $n (i32.load (i32.const 8)))
      (if (i32.eqz (local.get $n)) (then (return)))
      (local.set $p (i32.const 64))
      (block $written
        (loop $write
          (br_if $written (i32.eqz (local.get $n)))
          (i32.store (i32.const 16) (local.get $p))
          (i32.store (i32.const 20) (local.get $n))
          (if (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24))
            (then (call $proc_exit (i32.const 3))))
          (local.set $p (i32.add (local.get $p) (i32.load (i32.const 24))))
          (local.set $n (i32.sub (local.get $n) (i32.load (i32.const 24))))
          (br $write)))
      (br $more)))
  (func (export "exit3") (call $proc_exit (i32.const 3))))
"""


class Guest:
    """An instance of GUEST in its own store, with the host imports wired to Python."""

    def __init__(self, engine: wasmtime.Engine, module: wasmtime.Module) -> None:
        self.store = wasmtime.Store(engine)
        self.reenter: Callable[[int], int] = lambda n: 0

        def fail() -> None:
            raise LookupError("raised by a host function")

        i32 = wasmtime.ValType.i32()
        imports = [
            wasmtime.Func(self.store, wasmtime.FuncType([i32], [i32]), lambda n: self.reenter(n)),
            wasmtime.Func(self.store, wasmtime.FuncType([], []), fail),
        ]
        self.instance = wasmtime.Instance(self.store, module, imports)

    def export(self, name: str) -> wasmtime.Func:
        func = self.instance.exports(self.store)[name]
        assert isinstance(func, wasmtime.Func)
        return func

    def fast(self, name: str) -> FastCall:
        return FastCall(self.store, self.export(name), name=name)


class GuestCall(threading.Thread):
    """Runs one guest call on a worker thread; records the outcome and when it arrived."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended_at = math.inf
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.call()
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to inspect
            self.error = exc
        finally:
            self.ended_at = time.perf_counter()
            self.done.set()


class Canceller:
    """A `decide` that extends by one tick until cancelled, then traps with `message`.

    Also ends the guest once WAIT has passed, so a broken test never leaves a thread spinning.
    """

    def __init__(self, message: str = "cancelled") -> None:
        self.message = message
        self.cancel = threading.Event()
        self.running = threading.Event()
        self.threads: set[int] = set()
        self.calls = 0
        self.deadline = time.monotonic() + WAIT

    def __call__(self) -> int | str:
        self.calls += 1
        self.threads.add(threading.get_ident())
        self.running.set()
        if self.cancel.is_set():
            return self.message
        if time.monotonic() > self.deadline:
            return "test gave up"
        return 1


def _finish(store: wasmtime.Store, calls: list[GuestCall], deciders: list[Canceller]) -> None:
    """Stop the guests and wait for their threads before closing: closing a store in use would crash."""
    for decide in deciders:
        decide.cancel.set()
    for call in calls:
        if call.ident is not None:
            call.done.wait(WAIT)
    if all(call.done.is_set() or call.ident is None for call in calls):
        store.close()


@pytest.fixture
def epoch_engine() -> Iterator[wasmtime.Engine]:
    """An engine with epoch interruption and a 1 ms ticker thread."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.001):
            engine.increment_epoch()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    yield engine
    stop.set()
    ticker.join(WAIT)


@pytest.fixture
def engine() -> wasmtime.Engine:
    return wasmtime.Engine()


@pytest.fixture
def guest(engine: wasmtime.Engine) -> Iterator[Guest]:
    g = Guest(engine, wasmtime.Module(engine, GUEST))
    yield g
    g.store.close()


def _start_epoch_guest(engine: wasmtime.Engine, decide: Callable[[], int | str]) -> Guest:
    g = Guest(engine, wasmtime.Module(engine, GUEST))
    set_deadline_callback(g.store, decide)
    g.store.set_epoch_deadline(1)
    return g


# --- deadline callback -------------------------------------------------------------------------


def test_deadline_callback_cancels_a_spinning_guest_promptly(epoch_engine: wasmtime.Engine) -> None:
    decide = Canceller("cancelled")
    g = _start_epoch_guest(epoch_engine, decide)
    spin = g.fast("spin")
    call = GuestCall(lambda: spin([]))
    try:
        call.start()
        assert decide.running.wait(WAIT), "the guest never reached its deadline"
        cancelled_at = time.perf_counter()
        decide.cancel.set()
        assert call.done.wait(WAIT)

        assert call.ended_at - cancelled_at < CANCEL_LATENCY
        # The exact shape: a WasmtimeError (not a Trap, no trap_code) whose root cause is our message.
        assert type(call.error) is wasmtime.WasmtimeError
        assert not isinstance(call.error, wasmtime.Trap)
        assert "cancelled" in str(call.error)
        assert str(call.error).startswith("error while executing at wasm backtrace:")
        assert trap_message(call.error) == "cancelled"
        assert decide.threads == {call.ident}
    finally:
        _finish(g.store, [call], [decide])


def test_store_is_usable_after_a_callback_trap(epoch_engine: wasmtime.Engine) -> None:
    decide = Canceller()
    g = _start_epoch_guest(epoch_engine, decide)
    call = GuestCall(lambda: g.export("spin")(g.store))
    try:
        decide.cancel.set()
        with pytest.raises(wasmtime.WasmtimeError):
            g.fast("spin")([])
        decide.cancel.clear()
        g.store.set_epoch_deadline(1_000_000)
        assert g.export("ok")(g.store) == 7
        assert g.fast("add")([2, 3]) == [5]
        # ...and the callback still governs the next long call.
        g.store.set_epoch_deadline(1)
        decide.running.clear()
        call.start()
        assert decide.running.wait(WAIT)
        decide.cancel.set()
        assert call.done.wait(WAIT)
        assert trap_message(call.error) == "cancelled"  # type: ignore[arg-type]
    finally:
        _finish(g.store, [call], [decide])


def test_two_stores_on_two_threads_each_get_their_own_callback(epoch_engine: wasmtime.Engine) -> None:
    first, second = Canceller("stop-first"), Canceller("stop-second")
    g1, g2 = _start_epoch_guest(epoch_engine, first), _start_epoch_guest(epoch_engine, second)
    c1, c2 = GuestCall(lambda: g1.fast("spin")([])), GuestCall(lambda: g2.fast("spin")([]))
    try:
        c1.start()
        c2.start()
        assert first.running.wait(WAIT) and second.running.wait(WAIT)

        first.cancel.set()
        assert c1.done.wait(WAIT)
        assert trap_message(c1.error) == "stop-first"  # type: ignore[arg-type]
        assert not c2.done.is_set(), "cancelling one store stopped the other"
        calls_before = second.calls
        second.running.clear()
        assert second.running.wait(WAIT)  # the second guest is still being asked, so still running
        assert second.calls > calls_before

        second.cancel.set()
        assert c2.done.wait(WAIT)
        assert trap_message(c2.error) == "stop-second"  # type: ignore[arg-type]
        assert first.threads == {c1.ident} and second.threads == {c2.ident}
    finally:
        _finish(g1.store, [c1], [first])
        _finish(g2.store, [c2], [second])


def _expired_guest(decide: Callable[[], int | str]) -> Guest:
    """A guest whose deadline is already due: the callback runs at the first check, no ticker needed."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    g = Guest(engine, wasmtime.Module(engine, GUEST))
    set_deadline_callback(g.store, decide)
    g.store.set_epoch_deadline(0)
    return g


@pytest.mark.parametrize(
    ("verdict", "expected"),
    [
        (-1, "deadline callback returned -1"),
        (None, "deadline callback returned None"),
        (1.5, "deadline callback returned 1.5"),
        (True, "deadline callback returned True"),
        (b"x", "deadline callback returned b'x'"),
    ],
)
def test_invalid_verdicts_trap_with_a_message(verdict: object, expected: str) -> None:
    g = _expired_guest(lambda: verdict)  # type: ignore[arg-type,return-value]
    try:
        with pytest.raises(wasmtime.WasmtimeError) as info:
            g.fast("spin")([])
        assert trap_message(info.value).startswith(expected)
    finally:
        g.store.close()


def test_an_exception_in_decide_traps_and_never_escapes() -> None:
    def decide() -> int:
        raise RuntimeError("decide broke")

    g = _expired_guest(decide)
    try:
        with pytest.raises(wasmtime.WasmtimeError) as info:
            g.export("spin")(g.store)  # via Func.__call__: nothing left in wasmtime-py's exception slot
        assert trap_message(info.value) == "deadline callback raised RuntimeError: decide broke"
        g.store.set_epoch_deadline(1_000_000)
        assert g.export("ok")(g.store) == 7
    finally:
        g.store.close()


def test_zero_ticks_means_ask_again_at_the_next_check() -> None:
    seen = []

    def decide() -> int | str:
        seen.append(1)
        return 0 if len(seen) < 50 else "enough"

    g = _expired_guest(decide)
    try:
        with pytest.raises(wasmtime.WasmtimeError) as info:
            g.fast("spin")([])
        assert trap_message(info.value) == "enough"
        assert len(seen) == 50
    finally:
        g.store.close()


def test_a_bound_method_is_held_without_keeping_its_object_alive() -> None:
    class Owner:  # in the sidecar, an isolate: it owns the store, so the store must not own it
        def decide(self) -> str:
            return "decided"

    owner = Owner()
    g = _expired_guest(owner.decide)
    try:
        with pytest.raises(wasmtime.WasmtimeError) as info:
            g.fast("spin")([])
        assert trap_message(info.value) == "decided"
        gone = weakref.ref(owner)
        del owner
        gc.collect()
        assert gone() is None
        with pytest.raises(wasmtime.WasmtimeError) as info:  # still stopped, never let run on
            g.fast("spin")([])
        assert trap_message(info.value).startswith("deadline callback raised ReferenceError")
    finally:
        g.store.close()


def test_trap_message_handles_nul_and_non_ascii() -> None:
    g = _expired_guest(lambda: "stop\0here ✓")
    try:
        with pytest.raises(wasmtime.WasmtimeError) as info:
            g.fast("spin")([])
        assert trap_message(info.value) == "stop\\0here ✓"
    finally:
        g.store.close()


def test_registry_is_freed_when_stores_close(engine: wasmtime.Engine) -> None:
    baseline = live_deadline_callbacks()
    for _ in range(10_000):
        store = wasmtime.Store(engine)
        set_deadline_callback(store, lambda: 1)
        store.close()
    assert live_deadline_callbacks() == baseline

    store = wasmtime.Store(engine)
    set_deadline_callback(store, lambda: 1)
    set_deadline_callback(store, lambda: 2)  # replacing frees the first one
    assert live_deadline_callbacks() == baseline + 1
    del store  # never closed: collection closes it, and wasmtime runs the finalizer
    gc.collect()
    assert live_deadline_callbacks() == baseline


def test_set_deadline_callback_rejects_misuse(engine: wasmtime.Engine) -> None:
    store = wasmtime.Store(engine)
    with pytest.raises(TypeError):
        set_deadline_callback(store, "not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        set_deadline_callback(object(), lambda: 1)  # type: ignore[arg-type]
    store.close()
    baseline = live_deadline_callbacks()
    with pytest.raises(ValueError, match="closed"):
        set_deadline_callback(store, lambda: 1)
    assert live_deadline_callbacks() == baseline


def test_deadline_without_callback_is_a_trap_with_interrupt_code() -> None:
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    g = Guest(engine, wasmtime.Module(engine, GUEST))
    try:
        g.store.set_epoch_deadline(0)
        with pytest.raises(wasmtime.Trap) as info:
            g.fast("spin")([])
        assert info.value.trap_code == wasmtime.TrapCode.INTERRUPT
        assert trap_message(info.value) == "wasm trap: interrupt"
    finally:
        g.store.close()


def test_epoch_deadline_arms_the_store_and_refuses_a_closed_one() -> None:
    """No ticker runs: a deadline 0 ticks away is already due, one a million away never comes."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    g = Guest(engine, wasmtime.Module(engine, GUEST))
    arm = EpochDeadline(g.store)
    add = g.fast("add")
    arm(0)
    with pytest.raises(wasmtime.Trap) as info:
        add([2, 3])
    assert info.value.trap_code == wasmtime.TrapCode.INTERRUPT
    arm(1_000_000)
    assert add([2, 3]) == [5]
    g.store.close()
    with pytest.raises(ValueError, match="closed"):
        arm(1)


@pytest.mark.parametrize(
    ("text", "root"),
    [
        ("plain message", "plain message"),
        ("error while executing at wasm backtrace:\n    0: 0x2b - f\n\nCaused by:\n    cancelled\n", "cancelled"),
        ("top\n\nCaused by:\n    0: middle\n    1: root\n", "root"),
        ("top\n\nCaused by:\n    0: middle\n    1: root line one\n       line two\n", "root line one\nline two"),
        ("top\n\nCaused by:\n    first line\n    second line\n", "first line\nsecond line"),
    ],
)
def test_trap_message_parses_anyhow_chains(text: str, root: str) -> None:
    assert trap_message(Exception(text)) == root


# --- WASI stdin ---------------------------------------------------------------------------------


def _run_echo(engine: wasmtime.Engine, stdin: bytes | bytearray | memoryview) -> bytes:
    module = wasmtime.Module(engine, ECHO)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    out: list[bytes] = []
    config = wasmtime.WasiConfig()
    config.stdout_custom = out.append
    set_wasi_stdin_bytes(config, stdin)
    store = wasmtime.Store(engine)
    try:
        store.set_wasi(config)  # always before instantiating: a WASI guest without WASI aborts
        instance = linker.instantiate(store, module)
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
    finally:
        store.close()
    return b"".join(out)


@pytest.mark.parametrize(
    "stdin",
    [b"hello, guest\n", b"", bytes(range(256)) * 300, bytearray(b"from a bytearray"), memoryview(b"xxview")[2:]],
    ids=["text", "empty", "77KiB-binary", "bytearray", "memoryview"],
)
def test_wasi_stdin_bytes_reach_the_guest(engine: wasmtime.Engine, stdin: bytes) -> None:
    assert _run_echo(engine, stdin) == bytes(stdin)


def test_wasi_stdin_rejects_misuse(engine: wasmtime.Engine) -> None:
    config = wasmtime.WasiConfig()
    with pytest.raises(TypeError):
        set_wasi_stdin_bytes(config, "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        set_wasi_stdin_bytes(object(), b"")  # type: ignore[arg-type]
    store = wasmtime.Store(engine)
    store.set_wasi(config)  # consumes the config
    with pytest.raises(ValueError, match="closed"):
        set_wasi_stdin_bytes(config, b"late")
    store.close()


# --- FastCall -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("export", "value"),
    [
        ("id32", 0), ("id32", -1), ("id32", 2**31 - 1), ("id32", -(2**31)),
        ("id64", 2**63 - 1), ("id64", -(2**63)), ("id64", 12345678901234),
        ("idf32", 0.1), ("idf32", -3.5), ("idf32", math.inf), ("idf32", 3.4e38),
        ("idf64", 0.1), ("idf64", -1e308), ("idf64", -0.0), ("idf64", math.inf),
    ],
)
def test_fastcall_matches_func_call(guest: Guest, export: str, value: int | float) -> None:
    expected = guest.export(export)(guest.store, value)
    got = guest.fast(export)([value])
    assert got == [expected]
    assert type(got[0]) is type(expected)
    assert math.copysign(1, got[0]) == math.copysign(1, expected)


def test_fastcall_multi_value_and_no_value(guest: Guest) -> None:
    args = [-5, 1.5, 2.25, 9]
    assert guest.fast("mix")(args) == guest.export("mix")(guest.store, -5, 1.5, 2.25, 9) == [2.25, 9, -5, 1.5]
    assert guest.fast("nop")([]) == []
    assert guest.fast("nop").params == () and guest.fast("mix").results == ("f64", "i32", "i64", "f32")


def test_fastcall_nan_passes_through(guest: Guest) -> None:
    assert math.isnan(guest.fast("idf64")([math.nan])[0])
    assert math.isnan(guest.fast("idf32")([math.nan])[0])


def test_fastcall_unsigned_ints_wrap_and_ints_feed_floats(guest: Guest) -> None:
    assert guest.fast("id32")([2**32 - 1]) == [-1]
    assert guest.fast("id32")([2**31]) == [-(2**31)]
    assert guest.fast("id64")([2**64 - 1]) == [-1]
    assert guest.fast("add")([0xFFFFFFFF, 2]) == [1]
    assert guest.fast("idf64")([3]) == [3.0]
    assert guest.fast("idf32")([2**24]) == [16777216.0]
    assert guest.fast("id32")([True]) == [1]


@pytest.mark.parametrize(
    ("export", "args", "error", "match"),
    [
        ("add", [1], TypeError, r"export 'add' takes 2 argument\(s\) \(i32, i32\), got 1"),
        ("add", [1, 2, 3], TypeError, "got 3"),
        ("nop", [1], TypeError, r"takes 0 argument\(s\) \(none\)"),
        ("add", [1, 2.0], TypeError, r"argument 1 \(i32\): expected an int, got float"),
        ("add", ["1", 2], TypeError, r"argument 0 \(i32\): expected an int, got str"),
        ("add", [None, 2], TypeError, r"argument 0 \(i32\): expected an int, got NoneType"),
        ("add", [1, 2**32], ValueError, r"argument 1 \(i32\): 4294967296 is outside -2\*\*31\.\.2\*\*32-1"),
        ("add", [-(2**31) - 1, 0], ValueError, r"argument 0 \(i32\)"),
        ("id64", [2**64], ValueError, r"argument 0 \(i64\): .* outside -2\*\*63\.\.2\*\*64-1"),
        ("idf32", [1e39], ValueError, r"argument 0 \(f32\): 1e\+39 is outside the f32 range"),
        ("idf64", [10**400], ValueError, r"argument 0 \(f64\): .* too large"),
        ("idf64", ["1.5"], TypeError, r"argument 0 \(f64\): expected a float or int, got str"),
    ],
)
def test_fastcall_validates_arguments(
    guest: Guest, export: str, args: list[Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        guest.fast(export)(args)


@pytest.mark.parametrize(("export", "args"), [("boom", []), ("div", [1, 0]), ("div", [-(2**31), -1])])
def test_fastcall_raises_exactly_what_func_call_raises_on_traps(guest: Guest, export: str, args: list[int]) -> None:
    with pytest.raises(wasmtime.Trap) as slow:
        guest.export(export)(guest.store, *args)
    with pytest.raises(wasmtime.Trap) as fast:
        guest.fast(export)(args)
    assert type(fast.value) is type(slow.value)
    assert fast.value.trap_code == slow.value.trap_code
    assert str(fast.value) == str(slow.value)
    # The out-param was reset: the same FastCall works again.
    assert guest.fast("add")([1, 1]) == [2]


def test_fastcall_reraises_a_host_function_exception_like_func_call(guest: Guest) -> None:
    with pytest.raises(LookupError, match="raised by a host function"):
        guest.export("call_fail")(guest.store)
    fast = guest.fast("call_fail")
    with pytest.raises(LookupError, match="raised by a host function"):
        fast([])
    # The slot was drained: a call that does not fail returns normally afterwards.
    assert guest.fast("ok")([]) == [7]


def test_fastcall_exit_trap_matches_func_call(engine: wasmtime.Engine) -> None:
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    try:
        store.set_wasi(wasmtime.WasiConfig())
        instance = linker.instantiate(store, wasmtime.Module(engine, ECHO))
        exit3 = instance.exports(store)["exit3"]
        assert isinstance(exit3, wasmtime.Func)
        with pytest.raises(wasmtime.ExitTrap) as slow:
            exit3(store)
        with pytest.raises(wasmtime.ExitTrap) as fast:
            FastCall(store, exit3)([])
        assert fast.value.code == slow.value.code == 3
    finally:
        store.close()


def test_fastcall_is_reentrant_through_a_host_function(guest: Guest) -> None:
    fast_sum = guest.fast("sum")
    guest.reenter = lambda n: fast_sum([n])[0]
    assert fast_sum([10]) == [55]
    assert guest.export("sum")(guest.store, 4) == 10


def test_fastcall_refuses_unsupported_signatures(guest: Guest) -> None:
    # Each of these aborts the process through Func.__call__ or str(ValType) in wasmtime-py 50.0.1.
    with pytest.raises(TypeError, match="parameter 0 is v128"):
        guest.fast("v128_param")
    with pytest.raises(TypeError, match="result 0 is a reference type"):
        guest.fast("ref_result")
    with pytest.raises(TypeError, match="parameter 1 is v128"):
        guest.fast("exotic")
    with pytest.raises(TypeError, match="expected a wasmtime.Func"):
        FastCall(guest.store, guest.instance.exports(guest.store)["add"].type(guest.store))  # type: ignore[arg-type]


def test_value_type_names_never_abort(guest: Guest, engine: wasmtime.Engine) -> None:
    func_type = guest.export("exotic").type(guest.store)
    names = value_type_names(engine, [*func_type.params, *func_type.results])
    assert names == ("i32", "v128", "ref", "ref", "ref", "ref", "ref", "f32", "f64", "i64")
    # Types read from a Module (no instance, no store) work the same way.
    module = wasmtime.Module(engine, "(module (func (export \"f\") (param v128 i64) (result exnref f32) unreachable))")
    module_type = module.exports[0].type
    assert isinstance(module_type, wasmtime.FuncType)
    assert value_type_names(engine, [*module_type.params, *module_type.results]) == ("v128", "i64", "ref", "f32")


def test_fastcall_on_a_closed_store_raises_like_func_call(engine: wasmtime.Engine) -> None:
    g = Guest(engine, wasmtime.Module(engine, GUEST))
    fast, add = g.fast("add"), g.export("add")
    g.store.close()
    with pytest.raises(ValueError, match="already closed"):
        add(g.store, 1, 2)
    with pytest.raises(ValueError, match="already closed"):
        fast([1, 2])


def test_store_id_is_stable_and_matches_the_stores_objects(guest: Guest, engine: wasmtime.Engine) -> None:
    assert store_id(guest.store) == store_id(guest.store) == guest.export("add")._func.store_id
    other = wasmtime.Store(engine)
    assert store_id(other) != store_id(guest.store)
    other.close()


def test_instance_export_finds_one_export_by_name(guest: Guest) -> None:
    add = instance_export(guest.store, guest.instance, "add")
    assert isinstance(add, wasmtime.Func) and FastCall(guest.store, add)([2, 3]) == [5]
    assert instance_export(guest.store, guest.instance, "missing") is None


def test_instance_export_with_a_foreign_store_is_a_value_error_not_an_abort() -> None:
    # In a subprocess: were the check missing, wasmtime would abort the whole test run.
    script = textwrap.dedent(
        """
        import wasmtime
        from sidecar.wasmffi import instance_export
        engine = wasmtime.Engine()
        module = wasmtime.Module(engine, '(module (func (export "f") (result i32) (i32.const 1)))')
        mine, other = wasmtime.Store(engine), wasmtime.Store(engine)
        instance = wasmtime.Instance(mine, module, [])
        try:
            instance_export(other, instance, "f")
        except ValueError as exc:
            print("refused:", exc)
        assert isinstance(instance_export(mine, instance, "f"), wasmtime.Func)
        mine.close(); other.close()
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "refused: the instance belongs to another store" in done.stdout


def test_fastcall_with_a_foreign_store_is_a_value_error_not_an_abort() -> None:
    # In a subprocess: were the check missing, wasmtime would abort the whole test run.
    script = textwrap.dedent(
        """
        import wasmtime
        from sidecar.wasmffi import FastCall
        engine = wasmtime.Engine()
        module = wasmtime.Module(engine, '(module (func (export "f") (result i32) (i32.const 1)))')
        mine, other = wasmtime.Store(engine), wasmtime.Store(engine)
        func = wasmtime.Instance(mine, module, []).exports(mine)["f"]
        try:
            FastCall(other, func)
        except ValueError as exc:
            print("refused:", exc)
        assert FastCall(mine, func)([]) == [1]
        mine.close(); other.close()
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-c", script]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "refused: wasm function belongs to another store" in done.stdout


# --- pooling allocator --------------------------------------------------------------------------

POOLED = (
    '(module (memory (export "memory") 1)'
    ' (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0))))'
)


@pytest.fixture
def pooled_engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    # Two slots keep the address-space reservation small (~8 GiB of VmSize, nothing resident).
    enable_pooling(config, total_core_instances=2, max_memory_size=4 * 65536)
    return wasmtime.Engine(config)


def test_pooling_capacity_is_fixed_and_slots_are_reused(pooled_engine: wasmtime.Engine) -> None:
    module = wasmtime.Module(pooled_engine, POOLED)
    stores = [wasmtime.Store(pooled_engine) for _ in range(3)]
    try:
        wasmtime.Instance(stores[0], module, [])
        wasmtime.Instance(stores[1], module, [])
        with pytest.raises(wasmtime.WasmtimeError, match="maximum concurrent limit of 2 for core instances"):
            wasmtime.Instance(stores[2], module, [])
        stores[0].close()
        wasmtime.Instance(stores[2], module, [])  # the freed slot is reused
    finally:
        for store in stores:
            store.close()


def test_pooling_max_memory_size_caps_growth_and_refuses_big_modules(pooled_engine: wasmtime.Engine) -> None:
    store = wasmtime.Store(pooled_engine)
    try:
        instance = wasmtime.Instance(store, wasmtime.Module(pooled_engine, POOLED), [])
        grow = FastCall(store, instance.exports(store)["grow"])
        assert grow([3]) == [1]  # 4 pages: exactly the cap
        assert grow([1]) == [-1]  # past it: -1, as with Store.set_limits
    finally:
        store.close()
    with pytest.raises(wasmtime.WasmtimeError, match="does not fit in pooling allocator requirements"):
        wasmtime.Module(pooled_engine, "(module (memory 5))")


def test_enable_pooling_rejects_misuse() -> None:
    config = wasmtime.Config()
    with pytest.raises(ValueError, match="total_core_instances"):
        enable_pooling(config, max_memory_size=65536, total_core_instances=0)
    with pytest.raises(ValueError, match="max_memory_size"):
        enable_pooling(config, max_memory_size=-1)
    with pytest.raises(TypeError):
        enable_pooling(object(), max_memory_size=65536)  # type: ignore[arg-type]
    wasmtime.Engine(config)  # consumes the config
    with pytest.raises(ValueError, match="closed"):
        enable_pooling(config, max_memory_size=65536)
