"""Host functions that can trap their caller safely, and the caller's memory seen from inside one.

Owns the C trampoline behind every host function the sidecar gives a guest. wasmtime-py's own
route carries a Python exception out of a host function through one process-global slot, so
with guests on several threads a fault in one VM's host call can surface in another VM's call.
Here a host function signals a fault by raising `GuestFault`, which becomes a trap returned
straight to wasmtime for that call only; any other exception is a bug and traps the same way
with a generic message. Values cross as raw i32/i64 (the guest ABI uses nothing else).
Knows nothing about what the functions do.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable, Sequence

import structlog
import wasmtime
from wasmtime import _bindings, _ffi

from .slots import Slots, c_text

__all__ = ["GuestFault", "GuestMemory", "MemorySlot", "define_host_func"]

log = structlog.get_logger()
_CALLBACK_TYPE = _bindings._wasmtime_linker_define_func_unchecked.argtypes[6]
_FINALIZER_TYPE = _bindings._wasmtime_linker_define_func_unchecked.argtypes[8]
_KINDS = {"i32": wasmtime.ValType.i32, "i64": wasmtime.ValType.i64}
_MEMORY_EXPORT = b"memory"
_Signature = tuple[tuple[str, ...], tuple[str, ...]]
_FUNC_TYPES: weakref.WeakKeyDictionary[wasmtime.Engine, dict[_Signature, wasmtime.FuncType]]
_FUNC_TYPES = weakref.WeakKeyDictionary()

_Entry = tuple[
    Callable[["GuestMemory", list[int]], Sequence[int]], tuple[str, ...], tuple[str, ...], "MemorySlot | None"
]
# (function, param kinds, result kinds); freed by wasmtime when the last instance using it goes.
_FUNCS: Slots[_Entry] = Slots(_FINALIZER_TYPE)


class GuestFault(Exception):
    """Raised by a host function when the guest broke the ABI; `code` names how (a trap code)."""

    def __init__(self, message: str, code: str = "memory_out_of_bounds") -> None:
        super().__init__(message)
        self.code = code


class MemorySlot:
    """Where an instance's `memory` export is, once known: saves a lookup by name on every call."""

    __slots__ = ("handle",)

    def __init__(self) -> None:
        self.handle: object | None = None  # ctypes reference to its `wasmtime_memory_t`


class GuestMemory:
    """The calling instance's exported `memory`, located per call (growth can move it)."""

    __slots__ = ("_caller", "_handle", "_base", "size")

    def __init__(self, caller: object, handle: object | None = None) -> None:
        self._caller = caller
        self._handle = handle
        self._base: int | None = None
        self.size = 0

    def _locate(self) -> int:
        if self._base is None and self._handle is not None:
            context = _ffi.wasmtime_caller_context(self._caller)
            self._base = ctypes.cast(_ffi.wasmtime_memory_data(context, self._handle), ctypes.c_void_p).value or 0
            self.size = _ffi.wasmtime_memory_data_size(context, self._handle)
        elif self._base is None:
            extern = _ffi.wasmtime_extern_t()
            name = _MEMORY_EXPORT
            found = _ffi.wasmtime_caller_export_get(self._caller, name, len(name), ctypes.byref(extern))
            if not found or extern.kind != _ffi.WASMTIME_EXTERN_MEMORY.value:
                raise GuestFault("the guest exports no memory named `memory` (guest ABI v1)", "abi_violation")
            context = _ffi.wasmtime_caller_context(self._caller)
            memory = ctypes.byref(extern.of.memory)
            self._base = ctypes.cast(_ffi.wasmtime_memory_data(context, memory), ctypes.c_void_p).value or 0
            self.size = _ffi.wasmtime_memory_data_size(context, memory)
        return self._base

    def _check(self, pointer: int, length: int) -> int:
        base = self._locate()
        pointer &= 0xFFFFFFFF  # i32 offsets are unsigned addresses
        if length < 0 or pointer + length > self.size:
            raise GuestFault(f"guest range [{pointer}, +{length}) is outside its memory of {self.size} bytes")
        return base + pointer

    def read(self, pointer: int, length: int) -> bytes:
        address = self._check(pointer, length)
        return ctypes.string_at(address, length) if length else b""

    def write(self, pointer: int, data: bytes) -> None:
        address = self._check(pointer, len(data))
        if data:
            ctypes.memmove(address, data, len(data))


def define_host_func(
    linker: wasmtime.Linker,
    module: str,
    name: str,
    params: Sequence[str],
    results: Sequence[str],
    function: Callable[[GuestMemory, list[int]], Sequence[int]],
    memory: MemorySlot | None = None,
) -> None:
    """Define `module.name` in `linker`; `function(memory, args) -> results` runs per call.

    `memory` is the caller's, valid only during that call (located only if used, through the
    `MemorySlot` when its owner filled it in). Raising `GuestFault` traps the guest with its message.
    """
    ty = _func_type(linker.engine, tuple(params), tuple(results))
    slot = _FUNCS.add((function, tuple(params), tuple(results), memory))
    module_bytes, name_bytes = module.encode(), name.encode()
    error = _ffi.wasmtime_linker_define_func_unchecked(
        linker.ptr(), module_bytes, len(module_bytes), name_bytes, len(name_bytes), ty.ptr(), _trampoline, slot,
        _FUNCS.finalizer,
    )
    if error:
        _FUNCS.discard(slot)
        raise wasmtime.WasmtimeError._from_ptr(error)


@_CALLBACK_TYPE
def _trampoline(slot, caller, values, _count):  # type: ignore[no-untyped-def]
    try:
        entry = _FUNCS.get(slot)
        if entry is None:
            return _trap("host function is not registered")
        function, params, results, memory = entry
        args = [getattr(values[i], kind) for i, kind in enumerate(params)]
        produced = function(GuestMemory(caller, memory.handle if memory is not None else None), args)
        for i, kind in enumerate(results):
            setattr(values[i], kind, produced[i])
        return 0
    except GuestFault as fault:
        return _trap(str(fault))
    except BaseException as exc:  # noqa: BLE001 - must not cross the C boundary
        try:
            log.error("host_function_failed", error=type(exc).__name__, detail=str(exc))
        finally:
            return _trap("sidecar host function failed")  # noqa: B012


def _func_type(engine: wasmtime.Engine, params: tuple[str, ...], results: tuple[str, ...]) -> wasmtime.FuncType:
    """Built once per engine and signature: every instance needs the same few. A function type
    used with a linker of another engine aborts the process, hence one table per engine."""
    table = _FUNC_TYPES.get(engine)
    if table is None:
        table = _FUNC_TYPES.setdefault(engine, {})
    key = (params, results)
    ty = table.get(key)
    if ty is None:
        ty = table.setdefault(key, wasmtime.FuncType([_KINDS[p]() for p in params], [_KINDS[r]() for r in results]))
    return ty


def _trap(message: str) -> int:
    raw = c_text(message)
    return ctypes.cast(_ffi.wasmtime_trap_new(raw, len(raw)), ctypes.c_void_p).value or 0


# See `deadline`: a store freed during interpreter teardown may still call into this thunk.
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_trampoline))
