"""The pooling instance allocator (`wasmtime_pooling_allocation_*`), reachable only through `_ffi`.

Owns turning it on for a `wasmtime.Config`. Knows nothing about how many VMs the sidecar runs
or how big their memories may be: the caller passes those from its limits.

What it buys (benchmarks/bench_ffi.py, 2 cores, epoch interruption on, best of 7, three
runs): Store + instantiate + close of a small module 11.4-12.1 µs instead of 15.6-17.8 µs (the
instantiate part 7.6-8.2 instead of 12-14); with two threads instantiating at once 24-44
instead of 46-77 µs each (no mmap per instance, so no contention on the process's memory
map; the spread is the machine's load). Serialized modules load into pooled and default
engines alike, so the compile cache does not care.

What it costs, all measured with wasmtime 50.0.1:
- Every slot reserves its address space when the *Engine* is created: ~4.15 GiB of virtual
  memory per memory slot (the default 4 GiB reservation plus guards), whatever
  `max_memory_size` says; 128 slots is ~530 GiB of VmSize. Harmless unless the address space
  is capped (`ulimit -v`), where `Engine(config)` fails. Each engine has its own pool.
- Capacity is fixed: instantiating beyond `total_core_instances` (or memories, tables) live
  instances fails with `WasmtimeError("maximum concurrent limit of N for core instances
  reached")`. Size it to the VM bound plus what `vm.run` instantiates concurrently.
- `max_memory_size` is engine-wide: a module whose declared minimum exceeds it, or with more
  memories/tables than allowed per module, or a table above `table_elements`, is refused
  when the `Module` is created or deserialized (WasmtimeError "... does not fit in pooling
  allocator requirements"), not at instantiation. `memory.grow` past it returns -1, exactly as
  with `Store.set_limits`, which still applies on top (the smaller bound wins).
"""

from __future__ import annotations

import wasmtime
from wasmtime import _ffi

__all__ = ["enable_pooling"]

_U32 = (1 << 32) - 1
_USIZE = (1 << 64) - 1


def enable_pooling(
    config: wasmtime.Config,
    *,
    max_memory_size: int,
    total_core_instances: int = 128,
    total_memories: int | None = None,
    total_tables: int | None = None,
    table_elements: int | None = None,
    max_core_instance_size: int | None = None,
) -> None:
    """Switch `config` (before it becomes an Engine) to the pooling allocator.

    `max_memory_size` (bytes) is required because it silently caps every guest's memory.grow:
    pass the largest memory budget any VM on this engine may have. Memory and table slot
    counts default to `total_core_instances` (one of each per instance). `table_elements` and
    `max_core_instance_size` default to wasmtime's (20,000 elements and 1 MiB in 50.0.1;
    CPython's 20 MB wasm build fits both).
    """
    if not isinstance(config, wasmtime.Config):
        raise TypeError(f"expected a wasmtime.Config, got {type(config).__name__}")
    settings: list[tuple[str, int]] = [
        ("total_core_instances", _count("total_core_instances", total_core_instances)),
        ("total_memories", _count("total_memories", _default(total_memories, total_core_instances))),
        ("total_tables", _count("total_tables", _default(total_tables, total_core_instances))),
        ("max_memory_size", _size("max_memory_size", max_memory_size)),
    ]
    if table_elements is not None:
        settings.append(("table_elements", _size("table_elements", table_elements)))
    if max_core_instance_size is not None:
        settings.append(("max_core_instance_size", _size("max_core_instance_size", max_core_instance_size)))
    config_ptr = config.ptr()  # ValueError if an Engine already consumed it
    pool = _ffi.wasmtime_pooling_allocation_config_new()
    try:
        for name, value in settings:
            getattr(_ffi, f"wasmtime_pooling_allocation_config_{name}_set")(pool, value)
        _ffi.wasmtime_pooling_allocation_strategy_set(config_ptr, pool)  # clones the pool config
    finally:
        _ffi.wasmtime_pooling_allocation_config_delete(pool)


def _count(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _U32:
        raise ValueError(f"{name} must be an int in 1..{_U32}, got {value!r}")
    return value


def _size(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _USIZE:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _default(value: int | None, fallback: int) -> int:
    return fallback if value is None else value
