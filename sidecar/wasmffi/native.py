"""Our C extension, `_native.c`, loaded and wired to wasmtime: the guest ABI's data calls as
native host functions, the epoch ticker and the snapshot scan.

Owns loading the extension, refusing a build that no longer matches its source (an edit without
`pip install -e .`), and handing it the wasmtime C functions it calls, the ones wasmtime-py
loaded. `GuestIo` is one instance's input, response and output; `CALLBACKS` maps each function
name to its C callback, to define with `define_native_func(..., env=io.lend(), finalizer=RELEASE)`:
each definition holds a reference to the GuestIo and wasmtime drops it with the definition, so
the GuestIo lives exactly as long as something can call it. `EpochTicker` advances engines'
epochs from a thread that never takes the GIL. Knows nothing about limits or requests: the owner
passes the output budget and reads back what went wrong.
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

from wasmtime import _ffi

from . import capi

try:
    from . import _native
except ImportError as exc:
    raise ImportError(
        "sidecar.wasmffi._native is not built: installing the package (`pip install -e .`) compiles it"
    ) from exc

__all__ = ["CALLBACKS", "RELEASE", "EpochTicker", "GuestIo", "changed_runs", "check_build"]


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
RELEASE: int = _native.RELEASE  # the finalizer that gives back what `GuestIo.lend` lent
changed_runs = _native.changed_runs


def _setup() -> None:
    extern = _ffi.wasmtime_extern_t
    if extern.kind.offset != 0 or extern.kind.size != 1:  # _native reads the kind as the first byte
        raise ImportError("this wasmtime's wasmtime_extern_t is not the layout _native was written for")
    functions = (capi.memory_data, capi.memory_data_size, capi.trap_new, capi.caller_context, capi.caller_export_get,
                 capi.engine_increment_epoch)
    _native.setup(
        *(ctypes.cast(function, ctypes.c_void_p).value for function in functions),
        ctypes.sizeof(extern), extern.of.offset, _ffi.WASMTIME_EXTERN_MEMORY.value,
        ctypes.sizeof(_ffi.wasmtime_val_raw_t), ctypes.sizeof(_ffi.wasmtime_memory_t),
    )


_setup()
