"""Rewinding a used instance to the state a new one starts in, in place, instead of replacing it.

Owns the one case where a stateless VM's instance is reused after an answer: a runtime's (each
eval a pristine interpreter). A new instance of a baked interpreter pays ~350 copy-on-write page
faults at its first eval (~3 µs each here) plus a store and an instantiation; the same pages, once
private to an instance, take a `memcmp` and at most a `memcpy` each to set back. So after an eval
the pages the instance holds privately (`/proc/self/pagemap`) are compared with a pristine instance
of the same module, one never called, and the ones that differ copied back (`_native.restore_pages`).

A rewind must leave nothing an eval could see: it is exact only because of what the module is and
what the sidecar checks each time:
- a runtime's module is a pre-initialized bake, which `sidecar.preinit` makes only of a module
  whose whole state is its memories and mutable globals (no table writes, no dropped segments, no
  imported memory, table or mutable global) and which keeps the instrumentation exports naming
  them all: the memories are compared page by page, the globals set back;
- a memory that grew cannot shrink: the instance is replaced instead;
- the WASI context (open files, the descriptor table) lives in the store, not in the instance: it
  is replaced by a new one of the VM's view (`Store.set_wasi`), which closes what the eval opened;
- an eval that stopped mid-way (trap, timeout, cancel, a budget) never gets here: the VM retires
  its instance, as for any trap.
Fuel and the epoch deadline are set before every call anyway. Without a readable pagemap (no
`/proc`), nothing is rewound and instances are replaced as before.

A rewound instance keeps the pages it was given privately (copied back, not returned): that is
what spares the next eval its faults, and what it costs. Past `vm_rewind_resident_bytes` of them
(an eval that used much of the heap) it is replaced instead, which returns them.

Concurrency: a stateless VM's instances rewind on their own threads; all read the one pristine
instance, which nobody writes, and its store is closed (`close`) under the same lock.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import structlog
import wasmtime

from protocol.errors import RpcError

from .isolate import Isolate
from .limits import Limits
from .wasmbin import PREFIX
from .wasmffi import instance_export, restore_pages

log = structlog.get_logger()
_MEMORY, _GLOBAL = PREFIX + "memory_", PREFIX + "global_"
PAGE = mmap.PAGESIZE
_T = TypeVar("_T")
_pagemap: int | None = None
_pagemap_lock = threading.Lock()


def _pagemap_fd() -> int:
    """This process's page map, opened once (OSError where /proc is not there to read)."""
    global _pagemap
    with _pagemap_lock:
        if _pagemap is None:
            _pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        return _pagemap


class Rewinder:
    """A runtime's stateless VM's rewinds, against a pristine instance made at the first one (after
    an answer, like any replacement) and closed with the VM."""

    def __init__(self, vm_id: str, make: Callable[[], Isolate], wasi: Callable[[], wasmtime.WasiConfig | None],
                 warm_up: Callable[[Isolate], None], limits: Limits) -> None:
        """`make` builds a new instance of the VM, `wasi` a new context of its view, `warm_up`
        readies an instance to serve (as for a new one); `vm_rewind_resident_bytes` bounds the
        private pages a rewound instance keeps."""
        self._vm_id = vm_id
        self._limits = limits
        self._make = make
        self._wasi = wasi
        self._warm_up = warm_up
        self._lock = threading.Lock()
        self._pristine: Isolate | None = None
        self._memories: list[tuple[str, memoryview]] = []
        self._globals: list[tuple[str, object]] = []
        self._unavailable = False

    def renew(self, isolate: Isolate) -> bool:
        """Set `isolate` (idle, its last call ended normally) back to a new instance's state, with
        a new WASI context, and warm it up; False when that cannot be done exactly, or failed
        part way: the caller replaces it."""
        try:
            return self._rewind(isolate)
        except (OSError, wasmtime.WasmtimeError, RpcError) as exc:  # pagemap unreadable, a preopen gone, ...
            log.warning("instance_not_rewound", vm_id=self._vm_id, error=str(exc))
            return False

    def _rewind(self, isolate: Isolate) -> bool:
        resident = self._limits.vm_rewind_resident_bytes
        with self._lock:
            if not self._ready():
                return False
            used = [(_view(isolate, name), pristine) for name, pristine in self._memories]
            if any(len(memory) != len(pristine) for memory, pristine in used):
                return False  # grown: memory never shrinks
            private = sum(restore_pages(memory, pristine, self._pagemap)[1] for memory, pristine in used) * PAGE
        if private > resident:  # replaced, which returns them (the copies made were for nothing: rare)
            log.debug("instance_not_rewound", vm_id=self._vm_id, limit="vm_rewind_resident_bytes",
                      observed=private, capacity=resident)
            return False
        for name, value in self._globals:
            _export(isolate, name, wasmtime.Global).set_value(isolate.store, value)  # type: ignore[arg-type]
        wasi = self._wasi()
        if wasi is not None:
            isolate.store.set_wasi(wasi)  # the old context, and every file the eval left open, goes
        self._warm_up(isolate)
        return True

    def close(self, *, final: bool = False) -> None:
        """Close the pristine instance: the VM hibernates, and a later rewind makes another, or
        (`final`) it is disposed, and none does (a rewind already past the VM's check refuses)."""
        with self._lock:
            self._unavailable = self._unavailable or final
            pristine, self._pristine, self._memories = self._pristine, None, []
        if pristine is not None:
            pristine.close()

    def _ready(self) -> bool:
        """The pristine instance exists (made now if need be); False if this process cannot rewind, or
        the VM is gone."""
        if self._pristine is not None or self._unavailable:
            return not self._unavailable
        try:
            self._pagemap = _pagemap_fd()
        except OSError as exc:
            log.warning("rewind_unavailable", vm_id=self._vm_id, reason=str(exc))
            self._unavailable = True
            return False
        pristine = self._pristine = self._make()
        names = [e.name for e in pristine.compiled.exports]
        self._memories = [(name, _view(pristine, name)) for name in names if name.startswith(_MEMORY)]
        self._globals = [(name, _export(pristine, name, wasmtime.Global).value(pristine.store))
                         for name in names if name.startswith(_GLOBAL)]
        return True


def _export(isolate: Isolate, name: str, kind: type[_T]) -> _T:
    found = instance_export(isolate.store, isolate.instance, name)
    assert isinstance(found, kind), name
    return found


def _view(isolate: Isolate, name: str) -> memoryview:
    """An instance's memory as bytes, valid until it grows or its store closes."""
    memory = _export(isolate, name, wasmtime.Memory)
    return memoryview(memory.get_buffer_ptr(isolate.store)).cast("B")
