"""What callers know of a compiled module: the `CompiledModule` record and how it is described.

Owns the section structure's first check (`layout_of`, stage `parse`) and the description of a
module: exports and imports with their signatures (named without wasmtime's aborting value-type
path), declared memory and table minimums, whether it has a start function, is a WASI module, a
command. A `Description` is plain data, so the store can keep it beside a cache entry: naming a
CPython's ~90 signatures through wasmtime costs 3 ms on a quiet machine, 12 under load, more than
the rest of a load from the cache. Knows nothing about where the bytes came from, compiling or
caching.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import wasmtime

from protocol.errors import InvalidModuleError
from protocol.methods_vm import ExportInfo, ImportInfo

from .engines import EngineSettings
from .hostfiles import Buffer
from .limits import Limits
from .module_bytes import ModuleBytes
from .wasmbin import Module as Layout
from .wasmbin import WasmFormatError
from .wasmbin.module import MEMORY, START
from .wasmbin.sections import defined_tables
from .wasmffi import value_type_names

WASI_MODULE = "wasi_snapshot_preview1"
DESCRIPTION_ID = "description-1"  # names what `describe` computes, in the store's notes: change it with it
_KINDS = ((wasmtime.FuncType, "func"), (wasmtime.MemoryType, "memory"), (wasmtime.TableType, "table"),
          (wasmtime.GlobalType, "global"), (wasmtime.TagType, "tag"))


@dataclass(frozen=True)
class CompiledModule:
    """A module compiled for one engine setting, and what callers need to know before instantiating.

    `module_id`, `size_bytes` and `source` describe the bytes as given (a snapshot embeds them, so
    a restore elsewhere hits the same compile-cache entry); everything else describes `wasm`,
    the bytes compiled (after any transform). Both are made from `content` on first use: a module
    from the compile cache has read neither. `memory_minimums` (in bytes) and `table_minimums`
    (in elements) list imported ones first; they let a VM refuse, naming the store limit, what
    wasmtime's instantiation would refuse with a generic error.
    """

    module_id: str
    content: ModuleBytes
    size_bytes: int
    exports: list[ExportInfo]
    imports: list[ImportInfo]
    module: wasmtime.Module
    engine: wasmtime.Engine  # the one `module` belongs to: a store for it must come from this engine
    settings: EngineSettings
    cached: bool
    compile_ms: float
    memory_minimums: list[int]
    table_minimums: list[int]
    has_start: bool
    wasi: bool
    command: bool

    @property
    def source(self) -> bytes:
        return self.content.source

    @property
    def wasm(self) -> bytes:
        return self.content.wasm


def layout_of(data: Buffer) -> Layout:
    """The section structure; refuses what is not a core wasm module at all (stage `parse`)."""
    try:
        return Layout.parse(data)
    except WasmFormatError as exc:
        raise InvalidModuleError(f"malformed module: {exc}", stage="parse") from None


class Description(msgspec.Struct, frozen=True):
    """The `CompiledModule` fields that describe a module (see there)."""

    exports: list[ExportInfo]
    imports: list[ImportInfo]
    memory_minimums: list[int]
    table_minimums: list[int]
    has_start: bool
    wasi: bool
    command: bool


def describe(engine: wasmtime.Engine, module: wasmtime.Module, layout: Layout, limits: Limits) -> Description:
    """What describes `module`, compiled from the bytes `layout` splits."""
    imports = [
        ImportInfo(module=item.module, name=item.name or "", kind=_kind(item.type), **_signature(engine, item.type))
        for item in module.imports
    ]
    exports = [ExportInfo(name=item.name, kind=_kind(item.type), **_signature(engine, item.type))
               for item in module.exports]
    imported_memories = [item.type for item in module.imports if isinstance(item.type, wasmtime.MemoryType)]
    imported_tables = [item.type for item in module.imports if isinstance(item.type, wasmtime.TableType)]
    return Description(
        exports=exports,
        imports=imports,
        memory_minimums=[memory.limits.min * memory.page_size for memory in imported_memories]
        + _defined_memory_minimums(layout, limits.wasm_page_bytes),
        table_minimums=[table.limits.min for table in imported_tables]
        + [table.limits.minimum for table in defined_tables(layout)],
        has_start=layout.get(START) is not None,
        wasi=any(item.module == WASI_MODULE for item in imports),
        command=any(item.name == "_start" and item.kind == "func" for item in exports),
    )


def _kind(extern_type: object) -> str:
    return next(name for cls, name in _KINDS if isinstance(extern_type, cls))


def _signature(engine: wasmtime.Engine, extern_type: object) -> dict[str, list[str]]:
    """`params`/`results` of a function type, named without `str(ValType)` (which aborts on v128)."""
    if not isinstance(extern_type, wasmtime.FuncType):
        return {}
    params, results = extern_type.params, extern_type.results
    names = value_type_names(engine, [*params, *results])
    return {"params": list(names[: len(params)]), "results": list(names[len(params) :])}


def _defined_memory_minimums(layout: Layout, page_bytes: int) -> list[int]:
    """Declared minimum of each memory in the memory section, in bytes (the module is valid)."""
    section = layout.get(MEMORY)
    if section is None:
        return []
    reader = section.reader()
    minimums = []
    for _ in range(reader.u32()):
        flags = reader.u8()
        read = reader.u64 if flags & 0x04 else reader.u32  # memory64
        minimum = read()
        if flags & 0x01:
            read()  # maximum
        page = 1 << reader.u32() if flags & 0x08 else page_bytes  # custom page size
        minimums.append(minimum * page)
    return minimums
