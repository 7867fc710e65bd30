"""The unsafe edge: what the sidecar needs from `wasmtime._ffi` that wasmtime-py's API lacks.

Owns every direct use of wasmtime's C API in the sidecar, each wrapped so that misuse is a
Python exception rather than an abort, a leak, or an exception crossing the C boundary:
- `set_deadline_callback(store, decide)`: per-store epoch deadline callback, how a running
  guest is stopped early (cancel, dispose, a per-call timeout); `EpochDeadline(store)` re-arms
  the deadline before each call. `trap_message(exc)` reads the root cause back out of the
  error it produces, which is a `WasmtimeError`, not a `Trap` (details in `deadline`).
- `set_wasi_stdin_bytes(config, data)`: WASI stdin from a byte string.
- `FastCall(store, func)`: the host->guest call path for numeric exports, ~1 µs of Python per
  call instead of ~20; `store_id(store)` to check an object belongs to a store before use;
  `instance_export(store, instance, name)`: one export by name, without wrapping them all;
  `instantiate(pre, store)`, which learns the store's id from the instance it makes.
- `value_type_names(engine, valtypes)`: "i32".."v128"/"ref" without the C call that aborts
  the process on v128 and GC reference types (which `str(ValType)`, `ValType ==` and
  `Func.__call__` all make).
- `define_store_func(linker, ...)`: Python host functions whose object is found through the
  caller's store, so that one linker serves every instance of a module, and that trap only their
  own caller (`GuestFault`), never through wasmtime-py's process-global exception slot;
  `GuestMemory`, the caller's memory with bounds-checked reads and writes, found through a
  `MemorySlot`; `define_native_func` for host functions written in C, such as the guest ABI's
  data calls (`native`, our one C extension).
- `capi`: our own prototypes of the C functions on those per-call paths (plain addresses).
- `changed_runs(memory, chunk_bytes, baseline)`: the native scan behind a snapshot (which
  chunks of a memory differ from a baseline), at memory bandwidth without the GIL;
  `restore_pages(memory, pristine, pagemap_fd)`: the pages a memory holds privately set back to
  a pristine one's (an instance rewound in place).
- `enable_pooling(config, ...)`: the pooling instance allocator (measured ~20-30% faster
  instantiation; fixed capacity and a large address-space reservation, see `pooling`).

Knows nothing about VMs, budgets, limits or the protocol: callers decide deadlines, sizes and
what a trap means. Pinned to wasmtime-py 50.x (the private `_ffi`/`_bindings` layout).
"""

from .deadline import EpochDeadline, live_deadline_callbacks, set_deadline_callback, trap_message
from .fastcall import FastCall, instance_export, instantiate, store_id
from .hostfunc import (
    GuestFault,
    GuestMemory,
    MemorySlot,
    StoreHost,
    define_native_func,
    define_store_func,
)
from .native import changed_runs, restore_pages
from .pooling import enable_pooling
from .valtypes import value_type_names
from .wasi import set_wasi_stdin_bytes

__all__ = [
    "EpochDeadline",
    "FastCall",
    "GuestFault",
    "GuestMemory",
    "MemorySlot",
    "StoreHost",
    "changed_runs",
    "define_native_func",
    "define_store_func",
    "enable_pooling",
    "instance_export",
    "instantiate",
    "live_deadline_callbacks",
    "restore_pages",
    "set_deadline_callback",
    "set_wasi_stdin_bytes",
    "store_id",
    "trap_message",
    "value_type_names",
]
