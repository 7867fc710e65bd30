"""Capturing an idle instance's state and writing it back into a fresh one; the `wasm` format.

Owns the mapping between a live instance and a snapshot: memories are read through the
`__sidecar_memory_*` exports and mutable globals through `__sidecar_global_*` (added at load by
`sidecar.wasmbin.instrument`, so internal state is reachable without shifting any index), and
restored by writing them into a freshly instantiated copy whose start function is not run
again. Every value from a snapshot file is checked against the module and the VM's budgets
before it touches a store. Knows nothing about files or requests.
"""

from __future__ import annotations

import ctypes
import struct

import wasmtime

from protocol.errors import InvalidParamsError, InvalidSnapshotError

from .isolate import Isolate
from .limits import Limits
from .snapshot_file import GlobalValue, MemoryImage, sparse_runs
from .wasmbin import Instrumented, preinitialize

NUMERIC = ("i32", "i64", "f32", "f64")


def require_snapshottable(instrumented: Instrumented) -> None:
    if not instrumented.snapshottable:
        raise InvalidParamsError(
            "this VM's module cannot be snapshotted faithfully: " + "; ".join(instrumented.reasons),
            path="$.vm_id",
            reasons=list(instrumented.reasons),
        )
    odd = [g.valtype for g in instrumented.globals if g.valtype not in NUMERIC]
    if odd:
        raise InvalidParamsError(f"mutable globals of type {', '.join(odd)} cannot be snapshotted", path="$.vm_id")


def memory_views(isolate: Isolate, instrumented: Instrumented) -> dict[int, memoryview]:
    """Each defined memory of an instance, by index, as a view (valid while it is idle and open)."""
    exports = isolate.instance.exports(isolate.store)
    views = {}
    for index, name in instrumented.memories:
        memory = exports[name]
        assert isinstance(memory, wasmtime.Memory)
        views[index] = memoryview(memory.get_buffer_ptr(isolate.store)).cast("B")
    return views


def capture(isolate: Isolate, instrumented: Instrumented, baseline: dict[int, memoryview] | None = None, *,
            borrow: bool = False) -> tuple[list[MemoryImage], list[GlobalValue]]:
    """Memories (sparse) and mutable globals of an idle instance: no guest frames on its stack.
    A memory's runs are what differs from zero, or from its `baseline` contents when given.

    With `borrow`, the memories' runs are views into the linear memories instead of copies (a
    dense 64 MiB memory goes to its file without one): only for a caller done with them before
    the instance runs again or is closed, as the snapshot writer is within its job.
    """
    memories = []
    for index, view in memory_views(isolate, instrumented).items():
        runs: list = sparse_runs(view, baseline[index] if baseline is not None else None)
        if not borrow:
            runs = [(offset, bytes(run)) for offset, run in runs]
        memories.append(MemoryImage(index=index, size_bytes=len(view), runs=runs))
    exports = isolate.instance.exports(isolate.store)
    globals_ = []
    for index, name, valtype in instrumented.globals:
        item = exports[name]
        assert isinstance(item, wasmtime.Global)
        globals_.append(GlobalValue(index=index, valtype=valtype, value=item.value(isolate.store)))  # type: ignore[arg-type]
    return memories, globals_


def apply(isolate: Isolate, instrumented: Instrumented, memories: list[MemoryImage], globals_: list[GlobalValue],
          limits: Limits, *, diffed: bool = False) -> None:
    """Write a snapshot's state into a fresh instance; refuse anything that does not fit it.
    `diffed`: the runs are changes to the memory the instance starts with, not to zero."""
    by_index = {m.index: m for m in memories}
    expected = {index for index, _ in instrumented.memories}
    if set(by_index) != expected:
        raise InvalidSnapshotError("snapshot memories do not match the module", stage="module",
                                   expected=sorted(expected), found=sorted(by_index))
    exports = isolate.instance.exports(isolate.store)
    page = limits.wasm_page_bytes
    for (index, name), maximum in zip(instrumented.memories, instrumented.memory_maximums, strict=True):
        image = by_index[index]
        memory = exports[name]
        assert isinstance(memory, wasmtime.Memory)
        _restore_memory(isolate.store, memory, image, maximum, page, limits, diffed)
    _restore_globals(isolate, instrumented, exports, globals_)


def _restore_memory(store: wasmtime.Store, memory: wasmtime.Memory, image: MemoryImage, maximum: int | None,
                    page: int, limits: Limits, diffed: bool) -> None:
    current = memory.data_len(store)
    if image.size_bytes % page or image.size_bytes < current:
        raise InvalidSnapshotError(f"memory {image.index} size {image.size_bytes} is not a valid size for it",
                                   stage="bounds", memory=image.index)
    if maximum is not None and image.size_bytes > maximum * page:
        raise InvalidSnapshotError(f"memory {image.index} is larger than its declared maximum", stage="bounds")
    if image.size_bytes > limits.vm_memory_bytes:
        raise InvalidSnapshotError(
            f"memory {image.index} of {image.size_bytes} bytes exceeds vm_memory_bytes", stage="bounds",
            limit="vm_memory_bytes", capacity=limits.vm_memory_bytes, observed=image.size_bytes,
        )
    if image.size_bytes > current:
        memory.grow(store, (image.size_bytes - current) // page)
    base = ctypes.addressof(memory.data_ptr(store).contents)
    if not diffed:
        ctypes.memset(base, 0, current)  # what instantiation's data segments put there is not the state
    # No bounds check here: `snapshot_file.read` refused any run past its memory's `size_bytes`,
    # and the memory was just grown to exactly that size. A caller with images of other origin
    # must check the same before calling `apply`.
    for offset, data in image.runs:
        ctypes.memmove(base + offset, data, len(data))


def _restore_globals(isolate: Isolate, instrumented: Instrumented, exports: wasmtime.InstanceExports,
                     globals_: list[GlobalValue]) -> None:
    given = {g.index: g for g in globals_}
    wanted = {g.index: g for g in instrumented.globals}
    if set(given) != set(wanted):
        raise InvalidSnapshotError("snapshot globals do not match the module", stage="module",
                                   expected=sorted(wanted), found=sorted(given))
    for index, target in wanted.items():
        value = given[index]
        if value.valtype != target.valtype or not _fits(value):
            raise InvalidSnapshotError(f"global {index} holds a value of the wrong type", stage="module", index=index)
        item = exports[target.export]
        assert isinstance(item, wasmtime.Global)
        item.set_value(isolate.store, value.value)


def _fits(value: GlobalValue) -> bool:
    if value.valtype in ("i32", "i64"):
        bits = 32 if value.valtype == "i32" else 64
        return isinstance(value.value, int) and -(2 ** (bits - 1)) <= value.value < 2**bits
    return isinstance(value.value, float)


def to_wasm(instrumented: Instrumented, memories: list[MemoryImage], globals_: list[GlobalValue]) -> bytes:
    """The `wasm` format: a standalone pre-initialized module (Wizer-style) of this state."""
    flat = {}
    for image in memories:
        data = bytearray(image.size_bytes)
        for offset, run in image.runs:
            data[offset : offset + len(run)] = run
        flat[image.index] = bytes(data)
    values: dict[int, int | float | bytes] = {}
    for item in globals_:
        # Floats go as raw IEEE bytes so the module holds exactly the bits the guest had.
        if item.valtype == "f32":
            values[item.index] = struct.pack("<f", item.value)
        elif item.valtype == "f64":
            values[item.index] = struct.pack("<d", item.value)
        else:
            values[item.index] = item.value
    return preinitialize(instrumented.wasm, flat, values)
