"""The module store: module sources to compiled, described modules, once per engine.

Owns compiling once per (module, transform, engine) even under concurrent loads, through the
compile cache; refusing invalid modules (`validate`) with wasmtime's message and no traceback; and
the in-memory table (LRU, `runner_modules`; evicting drops only our reference). The table is keyed
by the engine object, never by its settings, and forgets an engine's code when `Engines` drops it;
the bytes of modules known by id are kept apart, so a `module_id` outlives the engine it was first
compiled for. Compiling is the runner's work: no guest budget applies to it. Every module a VM runs
is loaded through the load-time rewrite (`instrument_or_keep`: the instrumentation that makes
internal memories and globals reachable for snapshots and puts the start function under our
control); a load names its rewrite as `transform`/`transform_id` in cache keys, and the rewritten
bytes are cached with the code, and what of the source they changed (`sidecar.module_bytes`), so a
hit skips the rewrite and reads neither form of the bytes until one is used. A module can be derived from another
(`derive`: pre-initialization makes one by running it), cached under the base's id and the
derivation's, so a hit skips making it. Reading sources is `sidecar.module_sources`'s, describing
a module `sidecar.module_info`'s. Knows nothing about stores, instances or VMs.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import structlog
import wasmtime

from protocol.errors import InvalidModuleError, RequestCancelledError

from .compile_cache import CompileCache, cache_key
from .engines import EngineLease, Engines, EngineSettings
from .limits import Limits
from .module_bytes import LAYOUT_ID, ModuleBytes
from .module_info import DESCRIPTION_ID, WASI_MODULE, CompiledModule, Description, describe, layout_of
from .module_sources import Source, content_id, error_summary, read_source
from .wasmbin import WasmFormatError, instrument

__all__ = ["WASI_MODULE", "CompiledModule", "ModuleStore", "Source", "content_id", "instrument_or_keep", "read_source"]

Transform = Callable[[bytes], bytes]
_DIGEST = 32  # bytes of a sha256
# Module id, transform id, and the engine itself, not its settings: code compiled for a dropped
# engine must never serve its successor (see `sidecar.engines`).
_Key = tuple[str, str, wasmtime.Engine]


class _Known(NamedTuple):
    """What `get` needs to compile a module again for any engine: it outlives the compiled code."""

    module_id: str
    transform_id: str
    content: ModuleBytes  # its `wasm` has the transform applied; its `source` is what `module_id` names


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

    def source(self, params: Any) -> Source:
        """The module `params` names (`path`, `wasm_base64` or `wat`); a path hashed before in this
        boot is known by its seal in the cache, unread (`sidecar.module_sources`)."""
        return read_source(params, self._limits, self.cache)

    def load(
        self, source: bytes | Source, settings: EngineSettings, *, transform: Transform | None = None,
        transform_id: str = "",
    ) -> CompiledModule:
        """Compile (or fetch) `source` for `settings`; `transform` is a pure rewrite applied before
        compiling, named by `transform_id` so cached code of one rewrite never serves another."""
        if transform is not None and not transform_id:
            raise ValueError("a transform needs a transform_id: it is part of the cache key")
        given = source if isinstance(source, Source) else Source.of(source)
        module_id = given.module_id
        return self._obtain(module_id, transform_id, settings, transform_id,
                            lambda lease: self._build(module_id, transform_id, given.size,
                                                      lambda: ModuleBytes(given.data()), lease, transform))

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
                            lambda lease: self._build(module_id, known.transform_id, known.content.size,
                                                      lambda: known.content, lease, None))

    def derive(self, base_id: str, settings: EngineSettings, derivation_id: str, make: Callable[[], bytes], *,
               form_id: str) -> CompiledModule:
        """The module `make()` makes from module `base_id` (it may run it: a pre-initialization), kept
        with its bytes under (`base_id`, `derivation_id`, engine) here and in the compile cache: a hit
        (`cached`) skips `make`. It is known by its own id too, its bytes already in `form_id`'s form."""

        def build(lease: EngineLease) -> CompiledModule:
            key_hex = cache_key(base_id, derivation_id, lease.settings)
            started = time.perf_counter()
            found = self.cache.read(key_hex, lease.engine, _DIGEST) if self.cache else None
            if found is not None and found[2]:  # the bytes' id, then the bytes (mapped): no second hash
                module, stored_id, view = found
                module_id, content = "sha256:" + stored_id.hex(), ModuleBytes(view)
            else:
                wasm = make()
                started = time.perf_counter()
                module_id, module = content_id(wasm), _compile(lease.engine, wasm, None)[1]
                content = ModuleBytes(wasm)
            compiled = self._compiled(module_id, content, module, lease, found is not None, started, key_hex)
            if not compiled.cached and self.cache:
                self.cache.write(key_hex, module, [bytes.fromhex(module_id.removeprefix("sha256:")), wasm])
                # Also where a load of these bytes (in `form_id`'s form already) looks: a restore elsewhere.
                self.cache.write(load_key(module_id, form_id, lease.settings), module, content.layout())
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
                self._known[compiled.module_id] = _Known(compiled.module_id, form_id, compiled.content)
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

    def _build(self, module_id: str, transform_id: str, size: int, given: Callable[[], ModuleBytes],
               lease: EngineLease, transform: Transform | None) -> CompiledModule:
        """Module `module_id` (`size` bytes) under `transform_id` for the lease's engine: from the
        cache, whose entry keeps both its forms, or compiled from `given()`, whose `wasm` is what
        `transform` (if any) rewrites and whose `source` is what the id names."""
        engine, settings = lease.engine, lease.settings
        key_hex = load_key(module_id, transform_id, settings)
        started = time.perf_counter()
        found = self.cache.read(key_hex, engine) if self.cache else None
        content = ModuleBytes.stored(found[2]) if found is not None else None
        if found is not None and content is not None and content.size == size:
            module = found[0]
        else:
            if found is not None:  # checksummed, so only another layout under our key: written over
                _log().warning("compile_cache_rejected", path=str(self.cache.path(key_hex)),  # type: ignore[union-attr]
                               reason="its module bytes do not add up")
            found, original = None, given()
            wasm, module = _compile(engine, original.wasm, transform)
            content = ModuleBytes(wasm, original.source)
        compiled = self._compiled(module_id, content, module, lease, found is not None, started, key_hex)
        if found is None and self.cache:
            self.cache.write(key_hex, module, content.layout())
        compile_ms = round(compiled.compile_ms, 3)
        _log().info("module_compiled", module_id=module_id, size=size, compile_ms=compile_ms,
                    cached=compiled.cached, fingerprint=settings.fingerprint())
        return compiled

    def _compiled(self, module_id: str, content: ModuleBytes, module: wasmtime.Module, lease: EngineLease,
                  cached: bool, started: float, key_hex: str) -> CompiledModule:
        """The compiled module as callers see it (the code of cache entry `key_hex`, `cached` when it
        came from there); its compile took from `started` until now."""
        # A note beside the entry, as trusted as the entry: both checksummed, neither authenticated (who
        # can write the directory can put code there), and made together from the same bytes.
        name = hashlib.sha256(f"{DESCRIPTION_ID}:{key_hex}".encode()).hexdigest()
        note = self.cache.read_note(name) if cached and self.cache else None
        try:
            description = msgspec.msgpack.decode(note, type=Description)  # type: ignore[arg-type]
        except (TypeError, msgspec.DecodeError):  # no note (None), or one of another shape
            # From a mapped entry, parsing reads only the section headers.
            description = describe(lease.engine, module, layout_of(content.wasm_view), self._limits)
            if self.cache:
                self.cache.write_note(name, msgspec.msgpack.encode(description))
        return CompiledModule(
            module_id=module_id, content=content, size_bytes=content.size, module=module,
            engine=lease.engine, settings=lease.settings, cached=cached,
            compile_ms=(time.perf_counter() - started) * 1000, **msgspec.structs.asdict(description),
        )


def load_key(module_id: str, transform_id: str, settings: EngineSettings) -> str:
    """The compile-cache key of a load's entry: the module, its rewrite, the engine, and how the
    entry keeps the bytes (`sidecar.module_bytes`)."""
    return cache_key(module_id, f"{transform_id}+{LAYOUT_ID}", settings)


def _compile(engine: wasmtime.Engine, source: bytes, transform: Transform | None) -> tuple[bytes, wasmtime.Module]:
    """`source`, rewritten by `transform` if any, and compiled; refused at the stage that fails."""
    layout_of(source)  # what is not a core wasm module at all is a `parse` refusal, not wasmtime's
    # Validating first (~1% of a compile) gives wasmtime's plain message, and a transform only
    # ever sees a module wasmtime accepted.
    try:
        wasmtime.Module.validate(engine, source)
    except wasmtime.WasmtimeError as exc:
        raise InvalidModuleError(f"invalid module: {error_summary(exc)}", stage="validate") from None
    wasm = source
    if transform is not None:
        # Checked again: wasmtime would take bytes without the wasm magic for WebAssembly text.
        wasm = bytes(transform(source))
        layout_of(wasm)
    try:
        return wasm, wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as exc:
        raise InvalidModuleError(f"cannot compile module: {error_summary(exc)}", stage="validate") from None
