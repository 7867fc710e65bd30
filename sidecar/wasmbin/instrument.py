"""Instrumentation at load: exports that reach a module's internal state, and a snapshot verdict.

Owns the `__sidecar_*` export names, the rewrite that adds them without shifting any index
(only the export and start sections change; code is untouched), and the list of reasons a
module's state could not be captured and rebuilt faithfully. Idempotent, so our own snapshots
in "wasm" format load like any other module. Knows nothing about wasmtime, capturing state or
what the sidecar does with a module that is not snapshottable (it still runs normally).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from . import module as ids
from .code import scan_function
from .module import Module
from .reader import WasmFormatError
from .sections import (
    FUNC,
    GLOBAL,
    MEMORY,
    TABLE,
    Decoded,
    Export,
    FuncType,
    GlobalType,
    decode,
    encode_exports,
)
from .valtypes import is_numeric

PREFIX = "__sidecar_"
START_EXPORT = PREFIX + "start"
_TABLE_MUTATIONS = ("table.set", "table.grow", "table.fill", "table.copy", "table.init")
_DROPS = {"data.drop": "a data segment", "elem.drop": "an element segment"}


class ExportedMemory(NamedTuple):
    index: int  # in the memory index space, imports included
    export: str


class ExportedGlobal(NamedTuple):
    index: int  # in the global index space, imports included
    export: str
    valtype: str  # i32, i64, f32, f64, v128 (a reference type only in unsnapshottable modules)


@dataclass(frozen=True, slots=True)
class Instrumented:
    """The rewritten module and what a snapshot of its instances needs to know.

    `memories` lists every defined memory; the `memory_*` tuples run parallel to it.
    `grows_memory` is informational: the code contains `memory.grow`.
    """

    wasm: bytes
    snapshottable: bool
    reasons: tuple[str, ...]
    memories: tuple[ExportedMemory, ...]
    globals: tuple[ExportedGlobal, ...]
    start_export: str | None
    memory_minimums: tuple[int, ...]
    memory_maximums: tuple[int | None, ...]
    memory64: tuple[bool, ...]
    grows_memory: bool


class SnapshotError(WasmFormatError):
    """A well-formed module, or the state handed in for it, that cannot become a snapshot."""


def instrument(wasm: bytes) -> Instrumented:
    """Add the `__sidecar_*` exports, turn the start section into `__sidecar_start`, and judge.

    Malformed modules and foreign `__sidecar_*` exports raise WasmFormatError; a module that
    cannot be snapshotted is still instrumented, with `snapshottable` False and its reasons.
    """
    module = Module.parse(wasm)
    decoded = decode(module)
    memory_base = len(decoded.imported(MEMORY))
    global_base = len(decoded.imported(GLOBAL))
    memory_indices = range(memory_base, memory_base + len(decoded.memories))
    memories = tuple(ExportedMemory(i, f"{PREFIX}memory_{i}") for i in memory_indices)
    globals_ = tuple(
        ExportedGlobal(global_base + i, f"{PREFIX}global_{global_base + i}", g.type.valtype)
        for i, g in enumerate(decoded.globals)
        if g.type.mutable
    )
    wanted = [Export(m.export, MEMORY, m.index) for m in memories]
    wanted += [Export(g.export, GLOBAL, g.index) for g in globals_]
    if decoded.start is not None:
        _check_start_type(decoded, decoded.start)
        wanted.append(Export(START_EXPORT, FUNC, decoded.start))
    missing, start_export = _reconcile(decoded, wanted)

    uses = _scan(decoded)
    reasons = tuple(_reasons(decoded, uses, memory_base, global_base))
    if missing or decoded.start is not None:
        module = module.replace(ids.EXPORT, encode_exports(decoded.exports + missing))
        wasm = module.replace(ids.START, None).to_bytes()
    return Instrumented(
        wasm=bytes(wasm),
        snapshottable=not reasons,
        reasons=reasons,
        memories=memories,
        globals=globals_,
        start_export=start_export,
        memory_minimums=tuple(m.minimum for m in decoded.memories),
        memory_maximums=tuple(m.maximum for m in decoded.memories),
        memory64=tuple(m.index64 for m in decoded.memories),
        grows_memory="memory.grow" in uses,
    )


def _check_start_type(decoded: Decoded, function: int) -> None:
    imported = [i.type for i in decoded.imported(FUNC)]
    type_indices = imported + list(decoded.functions)
    if function >= len(type_indices):
        raise WasmFormatError(f"start function {function} does not exist")
    type_index = type_indices[function]
    if not isinstance(type_index, int) or type_index >= len(decoded.types):
        raise WasmFormatError(f"start function {function} has an unknown type")
    if decoded.types[type_index] != FuncType((), ()):
        raise WasmFormatError(f"start function {function} must take and return nothing")


def _reconcile(decoded: Decoded, wanted: list[Export]) -> tuple[tuple[Export, ...], str | None]:
    """Which wanted exports are missing, and the start export's name if there is one.

    An existing `__sidecar_*` export must be one we would add: left by an earlier instrumentation.
    A `__sidecar_start` without a start section is exactly that (we removed the section).
    """
    existing = {e.name: e for e in decoded.exports}
    if len(existing) != len(decoded.exports):
        raise WasmFormatError("duplicate export names")
    by_name = {e.name: e for e in wanted}
    start_export = START_EXPORT if decoded.start is not None else None
    for export in decoded.exports:
        if not export.name.startswith(PREFIX) or by_name.get(export.name) == export:
            continue
        if export.name == START_EXPORT and decoded.start is None and export.kind == FUNC:
            _check_start_type(decoded, export.index)
            start_export = START_EXPORT
            continue
        raise WasmFormatError(f"export {export.name!r} uses the reserved prefix {PREFIX!r} but is not ours")
    return tuple(e for e in wanted if e.name not in existing), start_export


def _scan(decoded: Decoded) -> dict[str, list[int]]:
    """Notable operation -> the functions (function index space) that contain it."""
    base = len(decoded.imported(FUNC))
    uses: dict[str, list[int]] = {}
    for offset, body in enumerate(decoded.code):
        for op in scan_function(body.reader()):
            uses.setdefault(op, []).append(base + offset)
    return uses


def _where(op: str, functions: list[int]) -> str:
    more = f" and {len(functions) - 1} more" if len(functions) > 1 else ""
    return f"{op} in function {functions[0]}{more}"


def _reasons(
    decoded: Decoded, uses: dict[str, list[int]], memory_base: int, global_base: int
) -> Iterable[str]:
    for imp in decoded.imports:
        where = f"{imp.module}.{imp.name}"
        if imp.kind == MEMORY:
            yield f"imports a memory ({where})"
        elif imp.kind == TABLE:
            yield f"imports a table ({where})"
        elif isinstance(imp.type, GlobalType) and imp.type.mutable:
            yield f"imports a mutable global ({where})"
    for index, limits in enumerate(decoded.memories, memory_base):
        if limits.index64:
            yield f"memory {index} is 64-bit"
        if limits.shared:
            yield f"memory {index} is shared"
        if limits.page_size_log2 is not None:
            yield f"memory {index} has a custom page size"
    for index, global_ in enumerate(decoded.globals, global_base):
        if global_.type.mutable and not is_numeric(global_.type.valtype):
            yield f"mutable global {index} has reference type {global_.type.valtype}"
    for op in _TABLE_MUTATIONS:
        if op in uses:
            yield f"mutates a table ({_where(op, uses[op])})"
    for op, what in _DROPS.items():
        if op in uses:
            yield f"drops {what} ({_where(op, uses[op])})"
