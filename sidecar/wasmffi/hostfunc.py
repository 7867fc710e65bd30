"""Host functions that can trap their caller safely, and the caller's memory seen from inside one.

Owns the C trampoline behind every Python host function the sidecar gives a guest. wasmtime-py's
own route carries a Python exception out of a host function through one process-global slot, so
with guests on several threads a fault in one VM's host call can surface in another VM's call.
Here a host function signals a fault by raising `GuestFault`, which becomes a trap returned
straight to wasmtime for that call only; any other exception is a bug and traps the same way
with a generic message. Values cross as raw i32/i64 (the guest ABI uses nothing else).
`define_store_func` defines a method whose object is found per call through the caller's store
(`native.host_of`), so a single definition in a linker shared by many stores reaches each
store's own object and never another's; `define_native_func` defines a function written in C
(see `native`) through the same wasmtime call. A definition holds no object of any store (the
store's `GuestIo` refers to its host weakly), so a linker that outlives its stores keeps none of
them alive, and a `MemorySlot` refers to its store weakly. Knows nothing about what the
functions do.
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog
import wasmtime
from wasmtime import _ffi

from . import capi
from .native import host_of
from .slots import Slots, c_text
from .valtypes import raw_layout

__all__ = ["GuestFault", "GuestMemory", "MemorySlot", "StoreHost", "define_native_func", "define_store_func"]

log = structlog.get_logger()


# (data, caller, values, count) -> wasm_trap_t* (0 for none)
_CALLBACK_TYPE = ctypes.CFUNCTYPE(capi.SIZE, capi.VOID_P, capi.VOID_P, capi.VOID_P, capi.SIZE)
_FINALIZER_TYPE = ctypes.CFUNCTYPE(None, capi.VOID_P)
# The callback and finalizer go as addresses: Python trampolines and C functions alike.
_define_func_unchecked = capi.c_function(
    "wasmtime_linker_define_func_unchecked", capi.VOID_P, capi.VOID_P, ctypes.c_char_p, capi.SIZE, ctypes.c_char_p,
    capi.SIZE, capi.VOID_P, capi.VOID_P, capi.VOID_P, capi.VOID_P,
)
_KINDS = {"i32": wasmtime.ValType.i32, "i64": wasmtime.ValType.i64}
_MEMORY_EXPORT = b"memory"
_Signature = tuple[tuple[str, ...], tuple[str, ...]]
_FUNC_TYPES: weakref.WeakKeyDictionary[wasmtime.Engine, dict[_Signature, tuple[wasmtime.FuncType, int]]]
_FUNC_TYPES = weakref.WeakKeyDictionary()

_Entry = tuple[Callable[..., Sequence[int]], "_RawValues", "_RawValues"]
# (method, params, results); freed by wasmtime when the last linker or instance using it goes.
_FUNCS: Slots[_Entry] = Slots(_FINALIZER_TYPE)


class GuestFault(Exception):
    """Raised by a host function when the guest broke the ABI; `code` names how (a trap code)."""

    def __init__(self, message: str, code: str = "memory_out_of_bounds") -> None:
        super().__init__(message)
        self.code = code


class GuestMemory:
    """A guest's linear memory as a host function sees it: bounds-checked reads and writes.

    Located afresh on every access, since growth can move it. Raising `GuestFault` on a range
    outside it traps the calling guest.
    """

    __slots__ = ()

    def _where(self) -> tuple[int, int]:
        """(base address, size in bytes) right now."""
        raise NotImplementedError

    def read(self, pointer: int, length: int) -> bytes:
        base, size = self._where()
        pointer &= 0xFFFFFFFF  # i32 offsets are unsigned addresses
        if length < 0 or pointer + length > size:
            raise _outside(pointer, length, size)
        return ctypes.string_at(base + pointer, length) if length else b""

    def write(self, pointer: int, data: bytes) -> None:
        base, size = self._where()
        pointer &= 0xFFFFFFFF
        if pointer + len(data) > size:
            raise _outside(pointer, len(data), size)
        if data:
            ctypes.memmove(base + pointer, data, len(data))


def _outside(pointer: int, length: int, size: int) -> GuestFault:
    return GuestFault(f"guest range [{pointer}, +{length}) is outside its memory of {size} bytes")


class MemorySlot(GuestMemory):
    """One of an instance's memories, once its owner knows it: host functions reach the caller's
    memory through it instead of a lookup by name, and the owner reads its size cheaply.

    Holds the store's context and the memory's handle as addresses. `bind` keeps the `Memory`
    referenced (the handle lives in it) and the store weakly: a slot used by a host function is
    held as long as its store, so a strong reference would keep the store alive for good. The
    context is used only during a call into the store or after checking the store is open.
    """

    __slots__ = ("context", "handle", "_memory", "_store", "_base", "_size")

    def __init__(self) -> None:
        self.context = 0
        self.handle = 0  # address of the instance's `wasmtime_memory_t`, 0 until bound
        self._memory: wasmtime.Memory | None = None
        self._store: weakref.ref[wasmtime.Store] | None = None
        self._base = 0
        self._size = -1  # unknown: the first access reads the base

    def bind(self, store: wasmtime.Store, memory: wasmtime.Memory) -> MemorySlot:
        self.context = capi.address(store._context())
        self._store, self._memory = weakref.ref(store), memory
        self.handle = ctypes.addressof(memory._memory)
        self._size = -1  # whatever was known belonged to another memory
        return self

    def _where(self) -> tuple[int, int]:
        # Only called from inside a call into the store. Memory moves only when it grows, so
        # the base is re-read only when the size changed: one C call instead of two.
        size = capi.memory_data_size(self.context, self.handle)
        if size != self._size:
            self._base, self._size = capi.memory_data(self.context, self.handle), size
        return self._base, size

    def data_size(self) -> int:
        """The memory's current size in bytes (ValueError once its store is closed or gone)."""
        store = self._store() if self._store is not None else None
        if store is None:
            raise ValueError("the memory slot is not bound to a live store")
        if store._Store__context is None:  # closed: the context would be freed memory
            raise ValueError("already closed")
        return capi.memory_data_size(self.context, self.handle)


class _MemoryByName(GuestMemory):
    """The caller's export named `memory`, looked up through the caller: for host functions
    without a bound slot (e.g. called by a start function, before its instance exists)."""

    __slots__ = ("_caller", "_located")

    def __init__(self, caller: int) -> None:
        self._caller = caller  # valid only during this host call
        self._located: tuple[int, int] | None = None

    def _where(self) -> tuple[int, int]:
        if self._located is None:
            extern = _ffi.wasmtime_extern_t()
            name = _MEMORY_EXPORT
            found = capi.caller_export_get(self._caller, name, len(name), ctypes.addressof(extern))
            if not found or extern.kind != _ffi.WASMTIME_EXTERN_MEMORY.value:
                raise GuestFault("the guest exports no memory named `memory` (guest ABI v1)", "abi_violation")
            context, handle = capi.caller_context(self._caller), ctypes.addressof(extern.of.memory)
            self._located = (capi.memory_data(context, handle), capi.memory_data_size(context, handle))
        return self._located


class StoreHost(Protocol):
    """The object a store's `define_store_func` functions run on: a `GuestIo`'s `host` refers to
    it weakly (see `native.store_for`)."""

    memory: MemorySlot  # the instance's memory once bound; until then it is looked up by name

    def on_fault(self, fault: GuestFault) -> None: ...


def define_store_func(
    linker: wasmtime.Linker, module: str, name: str, params: Sequence[str], results: Sequence[str],
    method: Callable[[Any, GuestMemory, Sequence[int]], Sequence[int]],
) -> None:
    """Define `module.name` in `linker` as `method(host, memory, args) -> results`, where `host` is
    the `StoreHost` of the calling instance's store, found per call; the definition holds nothing
    of any store, so the linker may serve all of them. A store without one (or whose host is
    gone) traps its caller; a `GuestFault` is told to `host.on_fault` first, then traps the caller
    with its message."""
    slot = _FUNCS.add((method, _raw_values(tuple(params)), _raw_values(tuple(results))))
    _define(linker, module, name, params, results, _TRAMPOLINE_ADDRESS, slot, _FUNCS_FINALIZER_ADDRESS)


def define_native_func(
    linker: wasmtime.Linker, module: str, name: str, params: Sequence[str], results: Sequence[str], callback: int,
    env: int = 0, finalizer: int = 0,
) -> None:
    """Define `module.name` in `linker` as a C function of wasmtime's unchecked callback type
    (address `callback`), called with `env` (an address). `finalizer(env)` (a C function's
    address, 0 for none) runs once, when wasmtime drops the definition or here if defining fails,
    so `env` may carry a reference that the definition owns."""
    _define(linker, module, name, params, results, callback, env, finalizer)


def _define(linker: wasmtime.Linker, module: str, name: str, params: Sequence[str], results: Sequence[str],
            callback: int, data: int, finalizer: int) -> None:
    """`finalizer(data)` runs exactly once: from here until wasmtime has the definition, a
    failure runs it; from then on wasmtime does, even when it refuses the definition (the
    names are UTF-8, the one check it makes before taking `data` over)."""
    try:
        type_address = _func_type(linker.engine, tuple(params), tuple(results))
        module_bytes, name_bytes = module.encode(), name.encode()
        linker_address = capi.address(linker.ptr())
    except BaseException:
        if finalizer:
            _FINALIZER_TYPE(finalizer)(data)
        raise
    error = _define_func_unchecked(
        linker_address, module_bytes, len(module_bytes), name_bytes, len(name_bytes),
        type_address, callback, data, finalizer,
    )
    if error:
        raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(_ffi.wasmtime_error_t)))


class _RawValues:
    """One signature's values in wasmtime's array of raw slots, read or written in one step
    (the trampoline uses the parts directly: every Python call there is on a guest's path).
    Holds no state of a call: one per signature serves every definition (`_raw_values`)."""

    __slots__ = ("array", "pack_into", "unpack_from")

    def __init__(self, kinds: Sequence[str]) -> None:
        layout = raw_layout(kinds)
        self.array = (ctypes.c_char * layout.size) if kinds else None  # None: no values at all
        self.pack_into, self.unpack_from = layout.pack_into, layout.unpack_from


@functools.cache
def _raw_values(kinds: tuple[str, ...]) -> _RawValues:
    """The layout of `kinds`, built once: every instance defines the same few signatures."""
    return _RawValues(kinds)


@_CALLBACK_TYPE
def _trampoline(slot, caller, values, _count):  # type: ignore[no-untyped-def]
    host = None
    try:
        entry = _FUNCS.items.get(slot)
        if entry is None:
            return _trap("host function is not registered")
        method, params, results = entry
        args = params.unpack_from(params.array.from_address(values)) if params.array else ()
        owner = host_of(caller)  # the caller's store says whose call it is
        host = owner() if owner is not None else None
        if host is None:
            return _trap("this store has no host for its host functions")
        memory = host.memory
        produced = method(host, memory if memory.handle else _MemoryByName(caller), args)
        if results.array:
            results.pack_into(results.array.from_address(values), 0, *produced)
        return 0
    except GuestFault as fault:
        return _fault_trap(fault, host)
    except BaseException as exc:  # noqa: BLE001 - must not cross the C boundary
        _log_failure(exc)
        return _trap("sidecar host function failed")


def _fault_trap(fault: GuestFault, host: StoreHost) -> int:
    try:
        host.on_fault(fault)
    except BaseException as exc:  # noqa: BLE001 - the guest still traps with its own message
        _log_failure(exc)
    return _trap(str(fault))


def _log_failure(exc: BaseException) -> None:
    try:
        log.error("host_function_failed", error=type(exc).__name__, detail=str(exc))
    except BaseException:  # noqa: BLE001 - nothing may cross the C boundary, not even a logging failure
        pass


def _func_type(engine: wasmtime.Engine, params: tuple[str, ...], results: tuple[str, ...]) -> int:
    """The address of a function type, built once per engine and signature (the table keeps it
    alive): every instance needs the same few. A function type used with a linker of another
    engine aborts the process, hence one table per engine."""
    table = _FUNC_TYPES.get(engine)
    if table is None:
        table = _FUNC_TYPES.setdefault(engine, {})
    key = (params, results)
    known = table.get(key)
    if known is None:
        ty = wasmtime.FuncType([_KINDS[p]() for p in params], [_KINDS[r]() for r in results])
        known = table.setdefault(key, (ty, capi.address(ty.ptr())))
    return known[1]


def _trap(message: str) -> int:
    raw = c_text(message)
    return capi.trap_new(raw, len(raw))


# See `deadline`: a store freed during interpreter teardown may still call into this thunk.
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_trampoline))
# What every definition of a Python host function passes to wasmtime: both live for good.
_TRAMPOLINE_ADDRESS = capi.address(_trampoline)
_FUNCS_FINALIZER_ADDRESS = capi.address(_FUNCS.finalizer)
