"""A fast host->guest call path over `wasmtime_func_call_unchecked`.

Owns calling one exported function many times: the signature is resolved once, arguments are
packed with one precompiled `struct` into a buffer allocated once, and the call goes through a
private ctypes function object whose arguments are plain addresses. About 1 µs of Python per
call instead of 17-27 µs for `Func.__call__` (see benchmarks/bench_ffi.py).

Why "unchecked" is safe here: the C function trusts that the value kinds match the signature
and that the function belongs to the store. Kinds come from the function's own type, read at
construction (through `valtypes`, since the obvious route aborts on v128 and GC types), and the
store is checked (by id) at construction, where a mismatch is a `ValueError`: with the checked
API it is an abort of the whole process. Only i32/i64/f32/f64 are supported, so no GC roots
are involved. Use FastCall, not `Func.__call__`, for exports from untrusted modules:
`Func.__call__` aborts the process on a v128 or anyref/exnref/GC-ref parameter.

Knows nothing about VMs, budgets or deadlines: those are set on the store by the caller.
"""

from __future__ import annotations

import ctypes
import numbers
import operator
import struct
import threading
import weakref
from collections.abc import Sequence

import wasmtime
from wasmtime import _ffi
from wasmtime import _func as _wasmtime_func
from wasmtime._exportable import AsExtern
from wasmtime._extern import wrap_extern

from . import capi
from .valtypes import RAW_STRUCT_CODES, raw_layout, value_type_names

__all__ = ["FastCall", "instance_export", "store_id"]

_INT_BITS = {"i32": 32, "i64": 64}
_F32 = struct.Struct("<f")

_STORE_IDS: weakref.WeakKeyDictionary[wasmtime.Store, int] = weakref.WeakKeyDictionary()
_STORE_IDS_LOCK = threading.Lock()
# The probe global's type and value: engine-independent, read-only, kept for the process's life.
_PROBE_TYPE = capi.address(_ffi.wasm_globaltype_new(_ffi.wasm_valtype_new(_ffi.WASM_I32), _ffi.WASM_CONST))
_PROBE_VALUE = _ffi.wasmtime_val_t(kind=_ffi.WASMTIME_I32)


def store_id(store: wasmtime.Store) -> int:
    """wasmtime's id of `store`, comparable with the `store_id` of its objects (e.g. `func._func.store_id`).

    The C API has no getter, so the first call creates one tiny host global in the store and
    reads its id; the result is cached for the store's life. wasmtime never reuses store ids.
    Use it before handing an object to a store: the mismatch aborts the process otherwise.
    """
    if not isinstance(store, wasmtime.Store):
        raise TypeError(f"expected a wasmtime.Store, got {type(store).__name__}")
    with _STORE_IDS_LOCK:
        known = _STORE_IDS.get(store)
        if known is None:
            probe = _ffi.wasmtime_global_t()
            error = capi.global_new(capi.address(store._context()), _PROBE_TYPE, ctypes.addressof(_PROBE_VALUE),
                                    ctypes.addressof(probe))
            if error:  # never seen: an i32 constant always fits
                raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(_ffi.wasmtime_error_t)))
            known = _STORE_IDS[store] = probe.store_id
        return known


def instantiate(pre: wasmtime.InstancePre, store: wasmtime.Store) -> wasmtime.Instance:
    """`pre.instantiate(store)`, noting `store`'s id from the instance made in it: `store_id` then
    needs no probe global in that store (a few µs, and one more global, per new store)."""
    instance = pre.instantiate(store)
    with _STORE_IDS_LOCK:
        _STORE_IDS.setdefault(store, instance._instance.store_id)
    return instance


def instance_export(store: wasmtime.Store, instance: wasmtime.Instance, name: str) -> AsExtern | None:
    """`instance`'s export `name` (None if it has none), without `Instance.exports(store)`, which
    wraps every export (~6 µs each) to find one; a store the instance is not from is a ValueError."""
    if instance._instance.store_id != store_id(store):  # the C lookup aborts the process on a mismatch
        raise ValueError("the instance belongs to another store; reading its exports there would abort the process")
    item = _ffi.wasmtime_extern_t()
    raw = name.encode()
    if not capi.instance_export_get(capi.address(store._context()), ctypes.addressof(instance._instance), raw,
                                    len(raw), ctypes.addressof(item)):
        return None
    return wrap_extern(item)


class FastCall:
    """`fast(args) -> list` calls `func` in `store`, raising exactly what `Func.__call__` raises on failure.

    Arguments: i32/i64 take ints in the signed *or* unsigned range of the type (-2**31..2**32-1
    for i32: wasm integers are sign-agnostic and hosts in other languages send u32 values);
    results are always signed, as with `Func.__call__`. bool is an int (True is 1), as in
    `Func.__call__`. f32/f64 take floats and ints (JSON has one number type); a finite value
    beyond the f32 range is a ValueError instead of silently becoming infinity. Wrong count or
    type: `TypeError`; out of range: `ValueError`, both naming the argument index and wasm type.

    Failures of the call itself: `wasmtime.Trap` for guest traps (with `trap_code`),
    `wasmtime.WasmtimeError` for other errors (a deadline callback's verdict, WASI exit as its
    `ExitTrap` subclass), a Python exception raised by a host function re-raised as such (the
    same module-global slot `Func.__call__` drains), `ValueError` if the store was closed.

    Build and call it on the thread that owns the store, one at a time, like the store itself
    (construction touches the store; the argument buffer is shared between calls, though a
    re-entrant call from a host function is fine: wasmtime reads the arguments before the
    guest runs and writes results only when it returns). Building costs ~30 µs (the signature
    probe): build once per instance and export, not per call.
    """

    __slots__ = (
        "_buf", "_buf_addr", "_context_addr", "_func", "_func_addr", "_label", "_nparams", "_nslots",
        "_pack", "_param_kinds", "_result_kinds", "_store", "_trap", "_trap_addr", "_unpack",
    )

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, *, name: str | None = None) -> None:
        if not isinstance(func, wasmtime.Func):
            raise TypeError(f"expected a wasmtime.Func, got {type(func).__name__}")
        self._label = f"export {name!r}" if name is not None else "wasm function"
        if func._func.store_id != store_id(store):  # before func.type(store), which aborts on a mismatch
            raise ValueError(f"{self._label} belongs to another store; calling it in this one would abort the process")
        func_type = func.type(store)  # kept referenced while its ValTypes are read
        params, results = func_type.params, func_type.results
        names = value_type_names(store.engine, [*params, *results])
        self._param_kinds = self._supported(names[: len(params)], "parameter")
        self._result_kinds = self._supported(names[len(params) :], "result")
        self._nparams = len(self._param_kinds)
        self._nslots = max(self._nparams, len(self._result_kinds))
        self._pack = raw_layout(self._param_kinds).pack_into
        self._unpack = raw_layout(self._result_kinds).unpack_from
        self._buf = (_ffi.wasmtime_val_raw_t * max(self._nslots, 1))()
        self._trap = ctypes.c_void_p()
        # Our own copy of the handle, so nothing outside can change what the address points to.
        self._func = _ffi.wasmtime_func_t.from_buffer_copy(func._func)
        self._store = store
        # The context pointer is stable for the store's life; each call still checks the store is open.
        self._context_addr = capi.address(store._context())
        self._func_addr = ctypes.addressof(self._func)
        self._buf_addr = ctypes.addressof(self._buf)
        self._trap_addr = ctypes.addressof(self._trap)

    def __repr__(self) -> str:
        return f"FastCall({self._label}: ({', '.join(self._param_kinds)}) -> ({', '.join(self._result_kinds)}))"

    @property
    def params(self) -> tuple[str, ...]:
        """Parameter types, e.g. ("i32", "i32")."""
        return self._param_kinds

    @property
    def results(self) -> tuple[str, ...]:
        """Result types, e.g. ("i32",)."""
        return self._result_kinds

    def __call__(self, args: Sequence[int | float]) -> list[int | float]:
        if len(args) != self._nparams:
            raise TypeError(
                f"{self._label} takes {self._nparams} argument(s) ({', '.join(self._param_kinds) or 'none'}), "
                f"got {len(args)}"
            )
        if self._store._Store__context is None:  # closed (what `_context()` checks, without its frame)
            raise ValueError("already closed")  # as Func.__call__ does
        packed = True
        try:
            self._pack(self._buf, 0, *args)
        except (struct.error, TypeError, OverflowError, ValueError):
            packed = False  # unsigned ints, ints for floats, or a real error: the slow path decides
        if not packed:
            self._pack(self._buf, 0, *self._coerce(args))
        error = capi.func_call_unchecked(
            self._context_addr, self._func_addr, self._buf_addr, self._nslots, self._trap_addr
        )
        if error is not None or self._trap.value is not None:
            self._raise(error)
        return list(self._unpack(self._buf, 0))

    def _raise(self, error: int | None) -> None:
        """Wrap the out-params as `Func.__call__` does (its `enter_wasm`), including the exception slot."""
        trap_addr = self._trap.value
        self._trap.value = None  # the next call must start with a NULL trap pointer
        exc: BaseException | None = None
        if trap_addr is not None:
            exc = wasmtime.Trap._from_ptr(ctypes.cast(trap_addr, ctypes.POINTER(_ffi.wasm_trap_t)))
        if error is not None:  # never together with a trap; if it were, both are still freed
            wrapped = wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(_ffi.wasmtime_error_t)))
            exc = exc or wrapped
        _wasmtime_func.maybe_raise_last_exn()
        assert exc is not None
        raise exc

    def _coerce(self, args: Sequence[object]) -> list[int | float]:
        return [_coerce_one(value, kind, index, self._label) for index, (value, kind) in
                enumerate(zip(args, self._param_kinds, strict=True))]

    def _supported(self, names: tuple[str, ...], role: str) -> tuple[str, ...]:
        for index, name in enumerate(names):
            if name not in RAW_STRUCT_CODES:
                what = "a reference type" if name == "ref" else name
                raise TypeError(
                    f"{self._label}: {role} {index} is {what}; FastCall supports only i32, i64, f32 and f64"
                )
        return names


def _coerce_one(value: object, kind: str, index: int, label: str) -> int | float:
    where = f"{label}: argument {index} ({kind})"
    bits = _INT_BITS.get(kind)
    if bits is not None:
        try:
            number = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{where}: expected an int, got {type(value).__name__}") from None
        if not -(1 << (bits - 1)) <= number < (1 << bits):
            raise ValueError(f"{where}: {number} is outside -2**{bits - 1}..2**{bits}-1")
        return number - (1 << bits) if number >= (1 << (bits - 1)) else number
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: expected a float or int, got {type(value).__name__}")
    try:
        real = float(value)
    except OverflowError:
        raise ValueError(f"{where}: {value} is too large for a float") from None
    if kind == "f32":
        try:
            _F32.pack(real)
        except OverflowError:
            raise ValueError(f"{where}: {real!r} is outside the f32 range") from None
    return real
