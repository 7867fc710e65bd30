"""The module store: module sources to compiled, described modules, once per engine.

Owns reading a source (path, inline bytes, WebAssembly text) within `runner_module_bytes`;
refusing malformed (`parse`) and invalid (`validate`) modules with wasmtime's message and no
traceback; compiling once per (module, transform, engine) even under concurrent loads, through
the compile cache; describing exports, imports, memories and tables without wasmtime's aborting
value-type path; and the in-memory table (LRU, `runner_modules`; evicting drops only our
reference). The table is keyed by the engine object, never by its settings, and forgets an
engine's code when `Engines` drops it; the bytes of modules known by id are kept apart, so a
`module_id` outlives the engine it was first compiled for. Compiling is the runner's work: no
guest budget applies to it. Every module a VM runs is loaded through the load-time rewrite
(`instrument_or_keep`: the instrumentation that makes internal memories and globals reachable for
snapshots and puts the start function under our control); a load names its rewrite as
`transform`/`transform_id` in cache keys, and the rewritten bytes are cached with the code so a
hit skips the rewrite. A module can be derived from another (`derive`: pre-initialization makes
one by running it), cached under the base's id and the derivation's, so a hit skips making it.
Knows nothing about stores, instances or VMs.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import structlog
import wasmtime
from msgspec import UNSET

from protocol.errors import InvalidModuleError, InvalidParamsError, RequestCancelledError
from protocol.methods_vm import ExportInfo, ImportInfo

from .compile_cache import CompileCache, cache_key
from .engines import EngineLease, Engines, EngineSettings
from .hostfiles import TooLarge, read_bounded
from .limits import Limits
from .wasmbin import Module as Layout
from .wasmbin import WasmFormatError, instrument
from .wasmbin.module import MEMORY, START
from .wasmbin.sections import defined_tables
from .wasmffi import value_type_names

WASI_MODULE = "wasi_snapshot_preview1"
_SOURCES = ("path", "wasm_base64", "wat")
_KINDS = ((wasmtime.FuncType, "func"), (wasmtime.MemoryType, "memory"), (wasmtime.TableType, "table"),
          (wasmtime.GlobalType, "global"), (wasmtime.TagType, "tag"))

Transform = Callable[[bytes], bytes]
_DIGEST = 32  # bytes of a sha256
# Module id, transform id, and the engine itself, not its settings: code compiled for a dropped
# engine must never serve its successor (see `sidecar.engines`).
_Key = tuple[str, str, wasmtime.Engine]


class _Known(NamedTuple):
    """What `get` needs to compile a module again for any engine: it outlives the compiled code."""

    module_id: str
    transform_id: str
    wasm: bytes  # what to compile: the transform applied, or still to apply
    original: bytes  # the bytes as loaded, which `module_id` names


INSTRUMENT_ID = "sidecar-instrument-1"  # names the load-time rewrite in compile-cache keys


def instrument_or_keep(wasm: bytes) -> bytes:
    """The load-time rewrite. A module our rewriter cannot read (wasmtime accepted it) still
    runs, uninstrumented; a snapshot of it then says why it cannot be taken."""
    try:
        return instrument(wasm).wasm
    except WasmFormatError as exc:
        _log().warning("instrumentation_skipped", reason=str(exc))
        return wasm


def _log() -> Any:
    return structlog.get_logger()  # per event, so a later logging setup still applies


def read_source(params: Any, limits: Limits) -> bytes:
    """The module bytes named by `params` (`path`, `wasm_base64` or `wat`), within `runner_module_bytes`."""
    given = [name for name in _SOURCES if getattr(params, name, UNSET) is not UNSET]
    if len(given) != 1:
        raise InvalidParamsError("exactly one of path, wasm_base64, wat names the module", path="$")
    capacity = limits.runner_module_bytes
    if given[0] == "path":
        data = _read_file(params.path, limits)
    elif given[0] == "wasm_base64":
        data = params.wasm_base64  # msgspec has decoded the base64 already
    else:
        text = params.wat.encode()
        if len(text) > capacity:  # bounds the text parser's work too
            raise limits.exceeded("runner_module_bytes", len(text), module_source="wat")
        try:
            data = bytes(wasmtime.wat2wasm(text))
        except wasmtime.WasmtimeError as exc:
            raise InvalidModuleError(f"invalid WebAssembly text: {_summary(exc)}", stage="parse") from None
    if len(data) > capacity:
        raise limits.exceeded("runner_module_bytes", len(data), module_source=given[0])
    return data


def _read_file(path: str, limits: Limits) -> bytes:
    try:
        return read_bounded(path, limits.runner_module_bytes)
    except TooLarge as exc:
        raise limits.exceeded("runner_module_bytes", exc.size, path=path) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InvalidModuleError(f"cannot read module {path!r}: {reason}", stage="read", path=path) from None


def _summary(exc: Exception) -> str:
    """The informative line of a wasmtime message: the root cause of a chain, or the first line
    with its text position."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "Caused by:" in lines:
        return re.sub(r"^\d+: ", "", lines[-1])
    where = next((line[4:] for line in lines if line.startswith("--> ")), None)
    return f"{lines[0]} (at {where})" if where else lines[0]


@dataclass(frozen=True)
class CompiledModule:
    """A module compiled for one engine setting, and what callers need to know before instantiating.

    `module_id`, `size_bytes` and `source` describe the bytes as given (a snapshot embeds them, so
    a restore elsewhere hits the same compile-cache entry); everything else describes `wasm`,
    the bytes compiled (after any transform). `memory_minimums` (in bytes) and `table_minimums`
    (in elements) list imported ones first; they let a VM refuse, naming the store limit, what
    wasmtime's instantiation would refuse with a generic error.
    """

    module_id: str
    source: bytes
    wasm: bytes
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


class ModuleStore:
    """Compiled modules by content address; blocking and thread-safe, for worker threads."""

    def __init__(self, limits: Limits, engines: Engines, cache_dir: Path | None = None) -> None:
        self._limits = limits
        self._engines = engines
        self._table: OrderedDict[_Key, CompiledModule] = OrderedDict()
        self._known: OrderedDict[str, _Known] = OrderedDict()  # by module id, for `get`
        self._pending: dict[_Key, Future[CompiledModule]] = {}
        self._lock = threading.Lock()
        self.cache = CompileCache.open(cache_dir, limits.runner_cache_bytes)
        engines.on_evicted(self._forget)

    @property
    def compiling(self) -> int:
        """Compiles under way (each shared by every concurrent load of the same module)."""
        with self._lock:
            return len(self._pending)

    def load(
        self, wasm: bytes, settings: EngineSettings, *, transform: Transform | None = None, transform_id: str = ""
    ) -> CompiledModule:
        """Compile (or fetch) `wasm` for `settings`; `transform` is a pure rewrite applied before
        compiling, named by `transform_id` so cached code of one rewrite never serves another."""
        if transform is not None and not transform_id:
            raise ValueError("a transform needs a transform_id: it is part of the cache key")
        known = _Known(content_id(wasm), transform_id, wasm, wasm)
        return self._obtain(known.module_id, transform_id, settings, transform_id,
                            lambda lease: self._build(known, lease, transform))

    def get(self, module_id: str, settings: EngineSettings) -> CompiledModule:
        """The module loaded earlier as `module_id` (with its transform), compiled for `settings`."""
        with self._lock:
            known = self._known.get(module_id)
        if known is None:
            raise InvalidModuleError(
                f"no module loaded with id {module_id} (load it again with module.load)",
                stage="unknown", module_id=module_id,
            )
        # Its wasm is already transformed; the transform id keeps the cache key that of a load.
        return self._obtain(module_id, known.transform_id, settings, known.transform_id,
                            lambda lease: self._build(known, lease, None))

    def derive(self, base_id: str, settings: EngineSettings, derivation_id: str, make: Callable[[], bytes], *,
               form_id: str) -> CompiledModule:
        """The module `make()` makes from module `base_id` (it may run it: a pre-initialization), kept
        with its bytes under (`base_id`, `derivation_id`, engine) here and in the compile cache: a hit
        (`cached`) skips `make`. It is known by its own id too, its bytes already in `form_id`'s form."""

        def build(lease: EngineLease) -> CompiledModule:
            key_hex = cache_key(base_id, derivation_id, lease.settings)
            started = time.perf_counter()
            found = self.cache.read(key_hex, lease.engine, _DIGEST) if self.cache else None
            if found is not None and found[2]:  # the bytes' id, then the bytes: no second hash
                module, stored_id, wasm = found
                module_id = "sha256:" + stored_id.hex()
            else:
                wasm = make()
                started = time.perf_counter()
                module_id, module = content_id(wasm), _compile(lease.engine, wasm, _layout(wasm), None)[2]
            compiled = self._compiled(module_id, wasm, wasm, module, lease, _layout(wasm), found is not None, started)
            if not compiled.cached and self.cache:
                self.cache.write(key_hex, module, bytes.fromhex(module_id.removeprefix("sha256:")) + wasm)
                # Also where a load of these bytes (in `form_id`'s form already) looks: a restore elsewhere.
                self.cache.write(cache_key(module_id, form_id, lease.settings), module, wasm)
            _log().info("module_derived", base_id=base_id, derivation=derivation_id, module_id=compiled.module_id,
                        cached=compiled.cached, compile_ms=round(compiled.compile_ms, 3))
            return compiled

        return self._obtain(base_id, derivation_id, settings, form_id, build)

    def _obtain(self, name: str, transform_id: str, settings: EngineSettings, form_id: str,
                build: Callable[[EngineLease], CompiledModule]) -> CompiledModule:
        """The module under (`name`, `transform_id`, engine), built once however many ask at once; then
        known by its own id (`name`, for a load) in the form `form_id` too."""
        with self._engines.lease(settings) as lease:  # its engine stays while we compile for it
            key = (name, transform_id, lease.engine)
            with self._lock:
                hit = self._table.get(key)
                if hit is not None:
                    self._table.move_to_end(key)
                    if hit.module_id in self._known:
                        self._known.move_to_end(hit.module_id)
                    return hit
                pending = self._pending.get(key)
                owner = pending is None
                if owner:
                    pending = self._pending[key] = Future()
            if not owner:  # someone else builds it: wait for theirs
                try:
                    return replace(pending.result(), cached=True, compile_ms=0.0)
                except RequestCancelledError:
                    # The owner's request was cancelled mid-`make`: not this request's failure; try again.
                    return self._obtain(name, transform_id, settings, form_id, build)
            try:
                compiled = build(lease)
            except BaseException as exc:
                with self._lock:
                    del self._pending[key]
                pending.set_exception(exc)
                raise
            with self._lock:
                del self._pending[key]
                # As every later load reports it, made once: `replace` costs ~5 µs, and `vm.create` gets it.
                entry = replace(compiled, cached=True, compile_ms=0.0)
                self._table[key] = entry
                self._table[(compiled.module_id, form_id, lease.engine)] = entry
                self._known[compiled.module_id] = _Known(compiled.module_id, form_id, compiled.wasm, compiled.source)
                self._known.move_to_end(compiled.module_id)
                while len(self._table) > self._limits.runner_modules:
                    _, evicted = self._table.popitem(last=False)  # VMs keep their own reference
                    _log().info("module_evicted", module_id=evicted.module_id,
                                fingerprint=evicted.settings.fingerprint())
                while len(self._known) > self._limits.runner_modules:
                    self._known.popitem(last=False)
            pending.set_result(compiled)
            return compiled

    def _forget(self, engine: wasmtime.Engine) -> None:
        """`Engines` dropped `engine`: its code goes (the ids stay known, to compile again)."""
        with self._lock:
            for key in [key for key in self._table if key[2] is engine]:
                del self._table[key]

    def _build(self, known: _Known, lease: EngineLease, transform: Transform | None) -> CompiledModule:
        module_id, transform_id, source, original = known
        engine, settings = lease.engine, lease.settings
        layout = _layout(source)
        key_hex = cache_key(module_id, transform_id, settings)
        started = time.perf_counter()
        found = self.cache.read(key_hex, engine) if self.cache else None
        if found is None:
            wasm, layout, module = _compile(engine, source, layout, transform)
        else:
            module, _, stored = found
            wasm = stored if transform_id else source
            layout = _layout(wasm) if transform_id else layout
        compiled = self._compiled(module_id, original, wasm, module, lease, layout, found is not None, started)
        if found is None and self.cache:
            self.cache.write(key_hex, module, wasm if transform_id else b"")
        compile_ms = round(compiled.compile_ms, 3)
        _log().info("module_compiled", module_id=module_id, size=len(original), compile_ms=compile_ms,
                    cached=compiled.cached, fingerprint=settings.fingerprint())
        return compiled

    def _compiled(self, module_id: str, source: bytes, wasm: bytes, module: wasmtime.Module, lease: EngineLease,
                  layout: Layout, cached: bool, started: float) -> CompiledModule:
        """The compiled module as callers see it; its compile took from `started` until now."""
        return CompiledModule(
            module_id=module_id, source=source, wasm=wasm, size_bytes=len(source), module=module,
            engine=lease.engine, settings=lease.settings, cached=cached,
            compile_ms=(time.perf_counter() - started) * 1000, **_describe(lease.engine, module, layout, self._limits),
        )


def content_id(wasm: bytes) -> str:
    """The `module_id` of a module's bytes."""
    return "sha256:" + hashlib.sha256(wasm).hexdigest()


def _layout(data: bytes) -> Layout:
    """The section structure; refuses what is not a core wasm module at all (stage `parse`)."""
    try:
        return Layout.parse(data)
    except WasmFormatError as exc:
        raise InvalidModuleError(f"malformed module: {exc}", stage="parse") from None


def _compile(
    engine: wasmtime.Engine, source: bytes, layout: Layout, transform: Transform | None
) -> tuple[bytes, Layout, wasmtime.Module]:
    # Validating first (~1% of a compile) gives wasmtime's plain message, and a transform only
    # ever sees a module wasmtime accepted.
    try:
        wasmtime.Module.validate(engine, source)
    except wasmtime.WasmtimeError as exc:
        raise InvalidModuleError(f"invalid module: {_summary(exc)}", stage="validate") from None
    wasm = source
    if transform is not None:
        # Checked again: wasmtime would take bytes without the wasm magic for WebAssembly text.
        wasm = bytes(transform(source))
        layout = _layout(wasm)
    try:
        return wasm, layout, wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as exc:
        raise InvalidModuleError(f"cannot compile module: {_summary(exc)}", stage="validate") from None


def _describe(engine: wasmtime.Engine, module: wasmtime.Module, layout: Layout, limits: Limits) -> dict[str, Any]:
    imports = [
        ImportInfo(module=item.module, name=item.name or "", kind=_kind(item.type), **_signature(engine, item.type))
        for item in module.imports
    ]
    exports = [ExportInfo(name=item.name, kind=_kind(item.type), **_signature(engine, item.type))
               for item in module.exports]
    imported_memories = [item.type for item in module.imports if isinstance(item.type, wasmtime.MemoryType)]
    imported_tables = [item.type for item in module.imports if isinstance(item.type, wasmtime.TableType)]
    return {
        "exports": exports,
        "imports": imports,
        "memory_minimums": [memory.limits.min * memory.page_size for memory in imported_memories]
        + _defined_memory_minimums(layout, limits.wasm_page_bytes),
        "table_minimums": [table.limits.min for table in imported_tables]
        + [table.limits.minimum for table in defined_tables(layout)],
        "has_start": layout.get(START) is not None,
        "wasi": any(item.module == WASI_MODULE for item in imports),
        "command": any(item.name == "_start" and item.kind == "func" for item in exports),
    }


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
