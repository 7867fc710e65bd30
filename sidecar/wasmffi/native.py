"""Our C extension, `_native.c`, loaded and wired to wasmtime: the guest ABI's data calls as
native host functions, the epoch ticker and the snapshot scan.

Owns loading the extension, refusing a build that no longer matches its source (an edit without
`pip install -e .`), and handing it the wasmtime C functions it calls, the ones wasmtime-py
loaded. `GuestIo` is one instance's input, response and output, and the data of that instance's
store (`store_for`): the store holds a reference to it that wasmtime drops with the store, so the
GuestIo lives exactly as long as something can call it. `CALLBACKS` maps each function name to
its C callback, to define with `define_native_func` once per linker: each call finds its GuestIo
through the caller's store, so one linker serves every instance, and `host_of(caller)` gives
Python host functions the GuestIo's `host` the same way. `EpochTicker` advances engines'
epochs from a thread that never takes the GIL. Knows nothing about limits or requests: the owner
passes the output budget and reads back what went wrong.
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import wasmtime
from wasmtime import _bindings, _ffi

from . import capi

try:
    from . import _native
except ImportError as exc:
    raise ImportError(
        "sidecar.wasmffi._native is not built: installing the package (`pip install -e .`) compiles it"
    ) from exc

__all__ = ["CALLBACKS", "EpochTicker", "GuestIo", "changed_runs", "check_build", "host_of", "restore_pages",
           "store_for"]


def check_build(source: Path, built_from: str) -> None:
    """ImportError if `source` exists (a source tree) and is not what the module was built from."""
    if source.exists() and hashlib.sha256(source.read_bytes()).hexdigest() != built_from:
        raise ImportError(f"sidecar.wasmffi._native was built from another version of {source}: "
                          "rebuild it with `pip install -e .`")


# Before anything else is read from it: a stale build may lack it, which would hide why.
check_build(Path(__file__).with_name("_native.c"), _native.SOURCE_SHA256)

GuestIo = _native.GuestIo
EpochTicker = _native.EpochTicker
CALLBACKS: dict[str, int] = _native.CALLBACKS
changed_runs = _native.changed_runs
restore_pages = _native.restore_pages
host_of = _native.host_of
# The store's data finalizer, typed as wasmtime-py's binding of `wasmtime_store_new` wants it.
_RELEASE = ctypes.cast(_native.RELEASE, _bindings._wasmtime_store_new.argtypes[2])


def store_for(engine: wasmtime.Engine, io: GuestIo) -> wasmtime.Store:
    """A new store of `engine` whose data is `io`: the guest ABI's host functions called from its
    instances use that GuestIo, and the store keeps it alive until wasmtime frees the store.

    wasmtime-py's `Store(data=...)` keeps the data in its own table, out of reach of C host
    functions, so the store is made here and wrapped as the `Store` it would have built.
    """
    store = wasmtime.Store.__new__(wasmtime.Store)
    data = io.lend()
    try:
        pointer = _ffi.wasmtime_store_new(engine.ptr(), data, _RELEASE)
    except BaseException:
        _RELEASE(data)
        raise
    store._set_ptr(pointer)
    store._Store__context = _ffi.wasmtime_store_context(pointer)  # type: ignore[attr-defined]
    store.engine = engine
    return store


def _setup() -> None:
    extern = _ffi.wasmtime_extern_t
    if extern.kind.offset != 0 or extern.kind.size != 1:  # _native reads the kind as the first byte
        raise ImportError("this wasmtime's wasmtime_extern_t is not the layout _native was written for")
    functions = (capi.memory_data, capi.memory_data_size, capi.trap_new, capi.caller_context, capi.caller_export_get,
                 capi.engine_increment_epoch, capi.context_get_data)
    _native.setup(
        *(ctypes.cast(function, ctypes.c_void_p).value for function in functions),
        ctypes.sizeof(extern), extern.of.offset, _ffi.WASMTIME_EXTERN_MEMORY.value,
        ctypes.sizeof(_ffi.wasmtime_val_raw_t), ctypes.sizeof(_ffi.wasmtime_memory_t),
    )


_setup()
