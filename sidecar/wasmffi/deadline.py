"""Per-store epoch deadline callbacks (`wasmtime_store_epoch_deadline_callback`).

Owns the C callback that wasmtime runs when a store's epoch deadline passes, the registry of
Python `decide` functions behind it, and the parsing of the error that a "trap now" verdict
becomes. Knows nothing about why a VM stops (timeout, cancel, dispose): `decide` says.

Shape of the error in Python (measured, wasmtime-py 50.0.1): a "trap now" verdict is *not* a
`wasmtime.Trap`. wasmtime wraps our error in a backtrace context, and `wasmtime_func_call`
hands back every non-`Trap` error as a `wasmtime.WasmtimeError` (a sibling of `Trap`, not a
subclass; `trap_code` does not exist on it). Its `str()` is anyhow's debug rendering::

    error while executing at wasm backtrace:
        0:     0x2b - <unknown>!<wasm function 0>

    Caused by:
        cancelled

`trap_message(exc)` returns the root cause ("cancelled"). For comparison, a deadline reached
with no callback set is a `wasmtime.Trap` with `trap_code == TrapCode.INTERRUPT` and root cause
"wasm trap: interrupt".
"""

from __future__ import annotations

import ctypes
import re
import weakref
from collections.abc import Callable
from typing import Any

import wasmtime
from wasmtime import _bindings, _ffi

from . import capi
from .slots import Slots, c_text, call_unbound, unbound

__all__ = ["EpochDeadline", "live_deadline_callbacks", "set_deadline_callback", "trap_message"]

# Reuse the exact ctypes types of the binding: ctypes refuses a callback of a look-alike type.
_CALLBACK_TYPE = _bindings._wasmtime_store_epoch_deadline_callback.argtypes[1]
_FINALIZER_TYPE = _bindings._wasmtime_store_epoch_deadline_callback.argtypes[3]
_UPDATE_DEADLINE_CONTINUE = 0
# wasmtime adds the delta to the current epoch; a huge delta would wrap and fire at once.
# 2**62 ticks of 1 ms is longer than any process lives, so clamping changes nothing observable.
_FOREVER_TICKS = 2**62

# (decide, its owner) as `unbound` gives them; freed by wasmtime when the store is dropped or its
# callback replaced.
_DECIDERS: Slots[tuple[Callable[..., int | str], weakref.ref[Any] | None]] = Slots(_FINALIZER_TYPE)


def set_deadline_callback(store: wasmtime.Store, decide: Callable[[], int | str]) -> None:
    """Run `decide()` whenever `store`'s epoch deadline passes during guest execution.

    `decide` returns an `int` N >= 0 to continue with a new deadline N ticks from now (0 means
    "ask again at the next check", a busy poll), or a `str` to end the guest call now with that
    message (see the module docstring for the error shape). Anything else, and any exception
    from `decide`, also ends the call, with a message that says so. Nothing may escape into C:
    ctypes would only log it and return 0, which wasmtime reads as "continue with delta 0", a
    guest that can no longer be stopped (and wasmtime-py's own host-function route, one
    process-global exception slot, can surface it in another thread's call).

    `decide` runs on the thread executing the guest, holding the GIL, with the guest paused:
    keep it short, never block, and never touch `store` from it. A round trip costs ~1 µs, but
    the guest thread must first win the GIL, which can take up to `sys.getswitchinterval()`
    (5 ms) while another thread runs Python. So N is a trade: it bounds how late a cancel is
    noticed (N ticks plus that wait), and each return stalls the guest for a GIL hand-off;
    with a 1 ms tick, N=1 polls 1000 times a second per running guest. Setting a callback
    again replaces (and frees) the previous one; it is freed when the store is closed or
    collected. A bound method is held through a weak reference to its object (which usually
    owns `store`: held strongly, it would keep the store alive); once it is gone, the call ends.
    """
    if not isinstance(store, wasmtime.Store):
        raise TypeError(f"expected a wasmtime.Store, got {type(store).__name__}")
    if not callable(decide):
        raise TypeError(f"decide must be callable, got {type(decide).__name__}")
    store_ptr = store.ptr()  # ValueError('already closed') before anything is registered
    slot = _DECIDERS.add(unbound(decide))
    try:
        _ffi.wasmtime_store_epoch_deadline_callback(store_ptr, _on_deadline, slot, _DECIDERS.finalizer)
    except BaseException:
        _DECIDERS.discard(slot)
        raise


class EpochDeadline:
    """`deadline(ticks)` sets the store's epoch deadline `ticks` from now: done before every call
    into a guest, so it is one raw C call (~0.3 µs) instead of wasmtime-py's typed wrapper."""

    __slots__ = ("_context", "_store")

    def __init__(self, store: wasmtime.Store) -> None:
        self._store = store
        self._context = capi.address(store._context())

    def __call__(self, ticks: int) -> None:
        if self._store._Store__context is None:  # closed: the context would be freed memory
            raise ValueError("already closed")
        capi.context_set_epoch_deadline(self._context, ticks)


def live_deadline_callbacks() -> int:
    """How many registered callbacks are alive (one per store that has one): for stats and leak tests."""
    return len(_DECIDERS)


_CAUSED_BY = "\n\nCaused by:\n"
_NUMBERED_CAUSE = re.compile(r"^    \d+: ", re.MULTILINE)


def trap_message(exc: BaseException) -> str:
    """The root-cause message of a wasmtime error or trap, without the wasm backtrace.

    "cancelled" for a deadline callback that returned "cancelled"; "wasm trap: unreachable"
    for a guest trap; the whole text, stripped, for anything that has no "Caused by" section.
    """
    text = str(exc)
    head, found, causes = text.partition(_CAUSED_BY)
    if not found:
        return text.strip()
    # anyhow prints one cause indented by 4, several as "    0: ...", "    1: ...": the root is last.
    starts = [m.start() for m in _NUMBERED_CAUSE.finditer(causes)]
    root = causes[starts[-1] :] if starts else causes
    root = _NUMBERED_CAUSE.sub("", root, count=1)
    lines = root.rstrip().split("\n")
    return "\n".join(line.strip() for line in lines).strip()


@_CALLBACK_TYPE
def _on_deadline(_context, slot, delta_out, kind_out):  # type: ignore[no-untyped-def]
    try:
        entry = _DECIDERS.get(slot)
        if entry is None:
            message = "deadline callback is not registered"
        else:
            try:
                verdict = call_unbound(*entry)
            except BaseException as exc:  # noqa: BLE001 - must not cross the C boundary
                message = f"deadline callback raised {type(exc).__name__}: {_safe_str(exc)}"
            else:
                if isinstance(verdict, str):
                    message = verdict
                elif isinstance(verdict, int) and not isinstance(verdict, bool) and verdict >= 0:
                    delta_out[0] = min(verdict, _FOREVER_TICKS)
                    kind_out[0] = _UPDATE_DEADLINE_CONTINUE
                    return 0
                else:
                    message = f"deadline callback returned {_safe_repr(verdict)}, expected an int >= 0 or a str"
        return _new_error(message)
    except BaseException:  # noqa: BLE001 - last resort: still stop the guest, never raise into C
        return _new_error("deadline callback failed")


def _new_error(message: str) -> int:
    """A fresh `wasmtime_error_t*` as an address; wasmtime takes ownership of it."""
    return ctypes.cast(_ffi.wasmtime_error_new(c_text(message)), ctypes.c_void_p).value or 0


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001
        return "<unprintable>"


def _safe_repr(value: object) -> str:
    try:
        return repr(value)[:200]
    except BaseException:  # noqa: BLE001
        return f"<{type(value).__name__}>"


# A store still open at interpreter exit is deleted during teardown, after this module's globals
# may be gone, and wasmtime could still call `_on_deadline`: keep the thunk alive for good.
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_on_deadline))
