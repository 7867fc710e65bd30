"""An isolate: one wasmtime store with one instance of a VM's module, and the calls made into it.

Owns everything that touches a store: its budgets (`Store.set_limits`, fuel, the epoch deadline
and the callback that stops a guest for a timeout, a cancel or a dispose), the guest ABI bound to
this instance only, WASI when the module imports it, and translating what wasmtime raises into
the protocol's errors. The structure rules out the misuses that abort the process: the store
comes from the module's own engine, every object is created from and used with this isolate's
own store, a module that imports WASI always gets a store with WASI, and callers use one
isolate from one thread at a time. Knows nothing about requests or queues: the VM decides when
to call.
"""

from __future__ import annotations

import ctypes
import re
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import wasmtime

from protocol.errors import (
    CallTimeoutError,
    GuestTrapError,
    InvalidModuleError,
    InvalidParamsError,
    RequestCancelledError,
    RpcError,
    env_var_for,
)

from . import guest_abi
from .guest_abi import CallState, GuestAbi
from .limits import Limits
from .modules import CompiledModule
from .runtime import Runtime
from .wasmbin import PREFIX, START_EXPORT
from .wasmffi import (
    EpochDeadline,
    FastCall,
    MemorySlot,
    instance_export,
    instantiate,
    set_deadline_callback,
    trap_message,
)

log = structlog.get_logger()
_ARGUMENT = re.compile(r"argument (\d+)")
_TRAP_CODES = {code: code.name.lower() for code in wasmtime.TrapCode}
_TIMEOUT, _CANCELLED, _DISPOSED = "timeout", "cancelled", "disposed"
# A deadline one tick away fires at the next tick boundary, which may be a microsecond away: two
# ticks make the first check come after at least one whole tick of running, so only a guest that
# really runs that long makes its thread hand input reading over (see `_decide`).
_FIRST_CHECK_TICKS = 2
# Traps that mean a guest budget ran out: their errors name the limit like any other.
_BUDGET_OF_TRAP = {"out_of_fuel": "vm_fuel", "stack_overflow": "vm_stack_bytes"}


class Isolate:
    def __init__(
        self,
        vm_id: str,
        compiled: CompiledModule,
        limits: Limits,
        runtime: Runtime,
        issue_async: Callable[[str, bytes], int],
        wasi: wasmtime.WasiConfig | None = None,
        *,
        start: bool = True,
        timeout_limit: str = "vm_call_timeout_ms",
        fuel: int | None = None,
        refuse_host_calls: str | None = None,
    ) -> None:
        """`start=False` leaves the module's start function unrun: a restore writes the state.

        Work the runner does on a guest's module (pre-initialization) runs under other budgets than
        a guest call: `timeout_limit` names the limit that bounds instantiation and the start
        function and that a timeout names, `fuel` replaces `vm_fuel`, and `refuse_host_calls` is
        why the guest's host calls get -3 instead of reaching the host.
        """
        self.vm_id = vm_id
        self.compiled = compiled
        self.limits = limits
        self._yield_reading = runtime.reader.yield_reading
        self._fast: dict[str, FastCall] = {}
        self.memory_bytes = 0  # retained linear memory after the last call; read without the store
        self.calls = 0
        self.in_guest = False  # guest frames on this store's stack right now (no snapshot then)
        self._fuel = limits.vm_fuel if fuel is None else fuel  # read on every call: kept out of the limits lookup
        self._timeout_limit = timeout_limit
        timeout_ms = getattr(limits, timeout_limit)
        self.abi = GuestAbi(vm_id, limits, runtime.hostcalls, self._wait_for_host, issue_async,
                            refuse_host_calls or runtime.refuse_host_calls)
        self.store = self.abi.new_store(compiled.engine)
        # An isolate dropped without close() still frees its store, callbacks and guest memory
        # when collected. Not at interpreter exit (atexit=False): a guest may still be running in
        # it on a daemon thread then, and the process returns the memory anyway.
        self._free_store = weakref.finalize(self, self.store.close)
        self._free_store.atexit = False
        self._arm_deadline = EpochDeadline(self.store)
        self.store.set_limits(
            memory_size=limits.vm_memory_bytes,
            table_elements=limits.vm_table_elements,
            instances=limits.vm_instances,
            tables=limits.vm_tables,
            memories=limits.vm_memories,
        )
        if compiled.wasi:  # a WASI guest in a store without WASI aborts the process
            self.store.set_wasi(wasi if wasi is not None else wasmtime.WasiConfig())
        self._wait_serving = runtime.reader.wait_serving
        set_deadline_callback(self.store, self._decide)
        try:
            prepared = _prepared(compiled)
            self.instance = self._guarded(
                lambda _: instantiate(prepared.pre, self.store),
                (),
                CallState(deadline=time.monotonic() + timeout_ms / 1000),
                timeout_ms,
            )
            memories = self._exported_memories(prepared)
            abi_memory = memories.get("memory")
            if abi_memory is not None:
                self.abi.bind_memory(self.store, abi_memory)
            # The ABI's slot is bound to `memory` already: one slot per memory.
            self._memory_slots = [self.abi.memory if name == "memory" else MemorySlot().bind(self.store, memory)
                                  for name, memory in memories.items()]
            if start and prepared.starts:
                # Instrumentation moved the start function here so that it runs under the budgets.
                self.call(START_EXPORT, [], CallState(deadline=time.monotonic() + timeout_ms / 1000), timeout_ms)
        except BaseException:
            self._free_store()
            raise
        self._refresh_memory()

    def call(self, export: str, args: Sequence[int | float], state: CallState, timeout_ms: int) -> list[int | float]:
        fast = self._fast.get(export) or self._bind(export)
        try:
            return self._guarded(fast, args, state, timeout_ms)
        except (TypeError, ValueError) as exc:
            found = _ARGUMENT.search(str(exc))
            path = f"$.args[{found.group(1)}]" if found else "$.args"
            raise InvalidParamsError(str(exc), path=path) from None
        finally:
            self._refresh_memory()  # before the answer: a host that has it sees the memory it left

    def run_start(self, state: CallState, timeout_ms: int) -> int:
        """Run a WASI command's `_start`; its exit code (0 when it returns)."""
        start = self._fast.get("_start") or self._bind("_start")
        try:
            self._guarded(start, [], state, timeout_ms)
        except Exited as exited:
            return exited.code
        finally:
            self._refresh_memory()
        return 0

    def adopt(self, vm_id: str, issue_async: Callable[[str, bytes], int]) -> None:
        """A spare made before its VM (`sidecar.spares`) becomes `vm_id`'s, before its first call:
        its host calls and errors name that VM, its async calls go to that VM's queue."""
        self.vm_id = self.abi.vm_id = vm_id
        self.abi.issue_async = issue_async

    def fuel_used(self, budget: int) -> int:
        return budget - self.store.get_fuel()

    def close(self) -> None:
        self._fast.clear()
        self._free_store()

    def _bind(self, export: str) -> FastCall:
        found = instance_export(self.store, self.instance, export)
        if found is None:
            names = sorted(e.name for e in self.compiled.exports if e.kind == "func" and not e.name.startswith(PREFIX))
            raise InvalidParamsError(f"the module has no export {export!r}", path="$.export", exports=names)
        if not isinstance(found, wasmtime.Func):
            raise InvalidParamsError(f"export {export!r} is not a function", path="$.export")
        try:
            fast = FastCall(self.store, found, name=export)
        except TypeError as exc:  # v128 or reference types: not callable with JSON numbers
            raise InvalidParamsError(str(exc), path="$.export") from None
        self._fast[export] = fast
        return fast

    def _guarded(self, action: Callable[[Sequence[int | float]], Any], args: Sequence[int | float], state: CallState,
                 timeout_ms: int) -> Any:
        """Run `action(args)`, guest code, with this call's state, deadline and fuel; translate what
        it raises."""
        self.abi.begin(state)
        self._arm_deadline(_FIRST_CHECK_TICKS)
        if self._fuel:
            self.store.set_fuel(self._fuel)
        self.in_guest = True
        try:
            results = action(args)
            self.abi.end(state)
            return results
        except wasmtime.ExitTrap as exc:
            raise Exited(exc.code) from None
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            raise self._translate(exc, state, timeout_ms) from None
        finally:
            self.in_guest = False

    def _wait_for_host(self, answered: Callable[[], bool], timeout_s: float) -> None:
        """A guest blocked in `host_call` is not running: once answered, it gets a fresh first
        check, so a short call does not give up input reading for the time the host took."""
        self._wait_serving(answered, timeout_s)
        self._arm_deadline(_FIRST_CHECK_TICKS)

    def _decide(self) -> int | str:
        """Epoch tick while the guest runs (on its thread): stop it, or let it go on one more tick."""
        state = self.abi.state
        if state.stop is not None:
            return state.stop
        if time.monotonic() >= state.deadline:
            state.stop = _TIMEOUT
            return _TIMEOUT
        self._yield_reading()  # a guest that outlives a tick must not hold up the host's input
        return 1

    def _translate(self, exc: Exception, state: CallState, timeout_ms: int) -> RpcError:
        self.abi.absorb_faults(state)
        if state.exceeded is not None:
            return state.exceeded
        if state.stop == _TIMEOUT:
            limit = self._timeout_limit
            self.limits.exhausted(limit, timeout_ms, capacity=timeout_ms, vm_id=self.vm_id)
            return CallTimeoutError(limit=limit, capacity=timeout_ms, vm_id=self.vm_id)
        if state.stop in (_CANCELLED, _DISPOSED):
            return RequestCancelledError(f"the call was stopped: VM {state.stop}", vm_id=self.vm_id, reason=state.stop)
        if state.fault is not None:
            code, message = state.fault
            return GuestTrapError(code, message, vm_id=self.vm_id)
        message = trap_message(exc)
        code = _TRAP_CODES.get(getattr(exc, "trap_code", None), "") or _trap_code_from(message)
        budget = _BUDGET_OF_TRAP.get(code)
        if budget is None:
            return GuestTrapError(code, message, vm_id=self.vm_id)
        capacity = getattr(self.limits, budget)
        self.limits.exhausted(budget, capacity, capacity=capacity, vm_id=self.vm_id)
        return GuestTrapError(code, message, vm_id=self.vm_id, limit=budget, env=env_var_for(budget), capacity=capacity)

    def _exported_memories(self, prepared: _Prepared) -> dict[str, wasmtime.Memory]:
        """Each exported memory once, by name (`memory` first): instrumentation exports a memory
        under a second name. Which names are distinct is the module's to say, so only its first
        instance looks them all up and compares."""
        if prepared.memory_names is not None:
            return {name: instance_export(self.store, self.instance, name)  # type: ignore[misc]
                    for name in prepared.memory_names}
        names = sorted((e.name for e in self.compiled.exports if e.kind == "memory"), key=lambda n: n != "memory")
        found: dict[int, tuple[str, wasmtime.Memory]] = {}
        for name in names:
            item = instance_export(self.store, self.instance, name)
            if isinstance(item, wasmtime.Memory):
                found.setdefault(ctypes.addressof(item.data_ptr(self.store).contents), (name, item))
        memories = dict(found.values())
        prepared.memory_names = tuple(memories)
        return memories

    def refresh_memory(self) -> None:
        """Re-read the retained memory figure (after a restore wrote memory from outside a call)."""
        self._refresh_memory()

    def _refresh_memory(self) -> None:
        total = 0
        for slot in self._memory_slots:  # a plain loop: this runs after every call
            total += slot.data_size()
        self.memory_bytes = total


@dataclass
class _Prepared:
    """What every instance of one module shares: its imports resolved once against one linker
    with WASI and the guest ABI (an instance is then only a store and an instantiation; the
    host functions find the instance's state through its store, so nothing here belongs to any
    one instance), and the names of its distinct exported memories once an instance told them."""

    pre: wasmtime.InstancePre
    starts: bool  # instrumentation moved a start function to `__sidecar_start`: each instance runs it
    memory_names: tuple[str, ...] | None = None


_PREPARED: weakref.WeakKeyDictionary[wasmtime.Module, _Prepared] = weakref.WeakKeyDictionary()


def _prepared(compiled: CompiledModule) -> _Prepared:
    """The module's shared part, made once; an import that does not resolve is the module's
    fault (-32005), not a trap."""
    prepared = _PREPARED.get(compiled.module)
    if prepared is not None:
        return prepared
    linker = wasmtime.Linker(compiled.engine)
    try:
        if compiled.wasi:
            linker.define_wasi()
        guest_abi.define(linker)
        pre = linker.instantiate_pre(compiled.module)
    except wasmtime.WasmtimeError as exc:
        text = str(exc)
        if "unknown import" in text or "incompatible import type" in text:
            summary = " ".join(text.split("\n")[0].split())
            raise InvalidModuleError(f"the module's imports cannot be satisfied: {summary}", stage="imports",
                                     detail=trap_message(exc)) from None
        raise
    finally:
        linker.close()  # the InstancePre holds what it needs of the definitions
    starts = any(export.name == START_EXPORT for export in compiled.exports)
    return _PREPARED.setdefault(compiled.module, _Prepared(pre, starts))


def starts_with_guest_code(compiled: CompiledModule) -> bool:
    """Whether an instance runs guest code before its first call: a start function, moved to
    `__sidecar_start` by instrumentation or left in place (wasmtime then runs it at instantiation)."""
    return compiled.has_start or _prepared(compiled).starts


class Exited(Exception):
    """A WASI `proc_exit`: for a run not a failure, the command's exit code; `call` raises it."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _trap_code_from(message: str) -> str:
    """wasmtime's texts for traps that reach Python without a code (e.g. inside instantiation)."""
    text = message.lower()
    for needle, code in (
        ("unreachable", "unreachable"),
        ("call stack exhausted", "stack_overflow"),
        ("out of bounds memory access", "memory_out_of_bounds"),
        ("all fuel consumed", "out_of_fuel"),
        ("integer divide by zero", "integer_division_by_zero"),
        ("integer overflow", "integer_overflow"),
        ("indirect call", "indirect_call_to_null"),
    ):
        if needle in text:
            return code
    return "trap"
