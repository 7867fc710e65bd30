"""Pre-initialization: one export of a module run once, and the state it leaves baked into a module.

Owns what a `preinit` does between a compiled, admitted module and the bytes of its baked form,
and what of that can fail, as protocol errors. The run is the runner's work on the guest's module:
one store with the guest's store limits (so `vm_memory_bytes` caps what the export may grow) but
the runner's time limit `runner_preinit_timeout_ms` over instantiation, the start function and the
export together, and no fuel metering. In it the module's start function runs, then the export,
which takes nothing and returns nothing or an i32 status (nonzero is a failure). Host calls are
refused (the guest gets -3): no VM exists that a host could answer for, and a `module.load` has no
host waiting on guest calls. WASI stdout is discarded; stderr is kept within `vm_output_bytes` and
told in the error if the run fails. Then the state is captured as a snapshot would be
(`snapshots.capture`) and baked Wizer-style (`snapshots.to_wasm`: data segments, mutable global
initializers, no start function, the instrumentation exports kept so the result can be snapshotted
and pre-initialized again). The baked module's instances start from that state; compiled with
copy-on-write memory images (see `sidecar.engines`), instantiating one does not copy it.

Refusals: an export that is missing, reserved or of another type is the request's fault (-32602 at
`$.preinit.export`); a module whose state cannot be captured, and a run that traps, fails its
status, or calls `proc_exit`, are -32005 with stage `preinit`; a run past its time is -32004 naming
`runner_preinit_timeout_ms`; a guest budget that bites (`vm_output_bytes`) is -32002; a cancel
(`stop`) ends the run at the guest's next epoch tick with -32800.

`derivation_id` names a bake in cache keys: the spec in canonical form (the WASI view explicit,
preopened directories by real path, lists and env in the order given, since the guest sees that
order), this code's version and the load-time rewrite. Files under preopened directories are not
part of it: a host that changes what an export reads uses another path or spec. Knows nothing
about requests or where modules are kept: the caller gives the base module and keeps the result
(`ModuleStore.derive`, which caches it). `stoppable` runs one in a worker thread for a task (a
`module.load`) whose cancel must stop it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import msgspec
import structlog

from protocol.errors import (
    GuestTrapError,
    InvalidModuleError,
    InvalidParamsError,
    RequestCancelledError,
    RpcError,
)
from protocol.methods import PreinitSpec, WasiSettings

from . import snapshots
from .engines import EngineSettings
from .guest_abi import CallState
from .hostcalls import STATUS_REFUSED
from .isolate import Exited, Isolate
from .limits import Limits
from .modules import INSTRUMENT_ID, CompiledModule, ModuleStore
from .runtime import Runtime
from .wasi_view import wasi_config
from .wasmbin import PREFIX, START_EXPORT, Instrumented, WasmFormatError, instrument

log = structlog.get_logger()
T = TypeVar("T")
PREINIT_ID = "sidecar-preinit-1"  # names the bake in cache keys: change it when baked output changes
_UNMETERED = 2**64 - 1  # a run on a fuel-metering engine: the time limit bounds it, not fuel
_REFUSED = "host calls are refused during pre-initialization"
_WHERE = "$.preinit.export"
T = TypeVar("T")


def canonical(spec: PreinitSpec) -> PreinitSpec:
    """The spec as it runs and is named: its WASI view explicit, preopens by real path (a
    relative path or a symlink that changes names another directory)."""
    wasi = _view(spec)
    preopens = [msgspec.structs.replace(p, host_path=os.path.realpath(p.host_path)) for p in wasi.preopens]
    return PreinitSpec(export=spec.export, wasi=msgspec.structs.replace(wasi, preopens=preopens))


def _view(spec: PreinitSpec) -> WasiSettings:
    return spec.wasi if isinstance(spec.wasi, WasiSettings) else WasiSettings()


def derivation_id(spec: PreinitSpec) -> str:
    return f"{PREINIT_ID}+{INSTRUMENT_ID}:" + msgspec.json.encode(canonical(spec)).decode()


class Preinit:
    """One pre-initialization, for one request: `obtain` runs it on the caller's thread (or finds
    it cached), `stop` ends it from any thread. `preinit_ms` and `compile_ms` tell what it cost."""

    def __init__(self, spec: PreinitSpec, limits: Limits, runtime: Runtime) -> None:
        self.spec = canonical(spec)
        self.wasi = _view(self.spec)
        self.limits = limits
        self._runtime = runtime
        self._state = CallState()  # the run's; `stop` marks it, the isolate's deadline callback reads it
        self.preinit_ms = 0.0
        self.compile_ms = 0.0

    def stop(self) -> None:
        """From any thread (a cancel): the guest stops at its next epoch tick, a run not begun never begins."""
        self._state.stop = self._state.stop or "cancelled"

    def obtain(self, modules: ModuleStore, base_id: str, base: Callable[[], CompiledModule]) -> CompiledModule:
        """The baked form of module `base_id`, compiled for these limits' engine: cached (`cached`),
        or made now from `base()`, the module compiled and admitted for these limits."""

        def make() -> bytes:
            compiled = base()
            self.compile_ms += compiled.compile_ms
            return self.bake(compiled)

        settings = EngineSettings.from_limits(self.limits)
        baked = modules.derive(base_id, settings, derivation_id(self.spec), make, form_id=INSTRUMENT_ID)
        self.compile_ms += baked.compile_ms
        return baked

    def bake(self, base: CompiledModule) -> bytes:
        """Run the export in a fresh instance of `base` and return the module of the state it left."""
        started = time.perf_counter()
        with_status = _check_export(base, self.spec.export)
        instrumented = _instrumented(base)
        timeout_ms = self.limits.runner_preinit_timeout_ms
        state = self._state
        state.deadline = time.monotonic() + timeout_ms / 1000  # one deadline for the whole run
        state.output_cap = self.limits.vm_output_bytes
        stderr = _Kept(self.limits.vm_output_bytes)
        isolate: Isolate | None = None
        try:
            self._check_stopped()
            isolate = self._isolate(base, stderr)
            if instrumented.start_export is not None:
                isolate.call(START_EXPORT, [], state, timeout_ms)
            self._check_stopped()
            results = isolate.call(self.spec.export, [], state, timeout_ms)
            if with_status and results[0] != 0:
                raise InvalidModuleError(
                    f"pre-initialization failed: {self.spec.export!r} returned {results[0]}",
                    stage="preinit", export=self.spec.export, status=results[0],
                )
            memories, globals_ = snapshots.capture(isolate, instrumented)
        except Exited as exited:
            raise self._failed(InvalidModuleError(
                f"pre-initialization failed: the guest called proc_exit({exited.code})", stage="preinit",
                export=self.spec.export, exit_code=exited.code), isolate, stderr) from None
        except RpcError as exc:
            raise self._failed(exc, isolate, stderr) from None
        finally:
            if isolate is not None:
                isolate.close()
        self._check_stopped()
        try:
            baked = snapshots.to_wasm(instrumented, memories, globals_)
        except WasmFormatError as exc:  # state that does not fit a module (e.g. too many segments)
            raise InvalidModuleError(f"the state left by pre-initialization cannot be baked: {exc}",
                                     stage="preinit", export=self.spec.export) from None
        if len(baked) > self.limits.runner_module_bytes:
            raise self.limits.exceeded("runner_module_bytes", len(baked), stage="preinit", module_id=base.module_id)
        self.preinit_ms = (time.perf_counter() - started) * 1000
        log.info("module_preinitialized", module_id=base.module_id, export=self.spec.export,
                 memory_bytes=sum(image.size_bytes for image in memories), size=len(baked),
                 output_bytes=len(state.output), stderr_bytes=stderr.seen, preinit_ms=round(self.preinit_ms, 3))
        return baked

    def _isolate(self, base: CompiledModule, stderr: _Kept) -> Isolate:
        config = None
        if base.wasi:
            config = wasi_config(self.wasi)
            config.stderr_custom = stderr
        # The start function runs in `bake`, under the run's own state, so that a stop reaches it.
        return Isolate(
            "preinit", base, self.limits, self._runtime, lambda method, params: STATUS_REFUSED, config, start=False,
            timeout_limit="runner_preinit_timeout_ms", fuel=_UNMETERED if base.settings.fuel else 0,
            refuse_host_calls=_REFUSED,
        )

    def _check_stopped(self) -> None:
        if self._state.stop is not None:
            raise RequestCancelledError("the pre-initialization was stopped: request cancelled", reason="cancelled")

    def _failed(self, exc: RpcError, isolate: Isolate | None, stderr: _Kept) -> RpcError:
        """What the run raised, as the request's error: no VM exists to name, a trap is the module's."""
        exc.details.pop("vm_id", None)
        if isinstance(exc, GuestTrapError):
            exc = InvalidModuleError(f"pre-initialization trapped: {exc.details['trap_code']}", stage="preinit",
                                     export=self.spec.export, **exc.details)
        elif not isinstance(exc, RequestCancelledError):
            exc.details.setdefault("stage", "preinit")
            exc.details.setdefault("export", self.spec.export)
        if isinstance(exc, InvalidModuleError):
            # A grow refused by vm_memory_bytes shows only in what the guest made of it: say how much it held.
            exc.details["memory_bytes"] = isolate.memory_bytes if isolate is not None else 0
            if stderr.data:
                exc.details["stderr"] = stderr.data.decode("utf-8", "replace")
        log.info("preinit_failed", export=self.spec.export, kind=exc.kind, error=exc.message)
        return exc


class PreinitRuns:
    """The runs in flight, so that a shutdown can stop them and wait for them while the epoch
    ticker still runs (a guest notices a stop only at a tick); thread-safe."""

    def __init__(self) -> None:
        self._runs: set[Preinit] = set()
        self._changed = threading.Condition()

    @contextmanager
    def tracked(self, run: Preinit) -> Iterator[None]:
        with self._changed:
            self._runs.add(run)
        try:
            yield
        finally:
            with self._changed:
                self._runs.discard(run)
                self._changed.notify_all()

    def stop_all(self) -> None:
        with self._changed:
            runs = list(self._runs)
        for run in runs:
            run.stop()

    def wait_ended(self, timeout_s: float) -> bool:
        """True once no run is in flight; False if some still is after `timeout_s`."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._runs, timeout_s)


def _check_export(base: CompiledModule, name: str) -> bool:
    """Refuse an export the run cannot call; True when it returns an i32 status."""
    if name.startswith(PREFIX):
        raise InvalidParamsError(f"exports named {PREFIX}* belong to the sidecar", path=_WHERE)
    found = next((export for export in base.exports if export.name == name), None)
    if found is None:
        names = sorted(e.name for e in base.exports if e.kind == "func" and not e.name.startswith(PREFIX))
        raise InvalidParamsError(f"the module has no export {name!r}", path=_WHERE, exports=names)
    if found.kind != "func":
        raise InvalidParamsError(f"export {name!r} is a {found.kind}, not a function", path=_WHERE)
    params, results = found.params or [], found.results or []
    if params or results not in ([], ["i32"]):
        raise InvalidParamsError(
            f"export {name!r} takes ({', '.join(params)}) and returns ({', '.join(results)}); a preinit export "
            "takes nothing and returns nothing or an i32 status", path=_WHERE, params=params, results=results,
        )
    return bool(results)


def _instrumented(base: CompiledModule) -> Instrumented:
    """The facts a capture needs; -32005 for a module whose state a bake could not rebuild."""
    try:
        instrumented = instrument(base.wasm)  # idempotent: `base.wasm` is instrumented already
    except WasmFormatError as exc:
        raise InvalidModuleError(f"the module cannot be pre-initialized: {exc}", stage="preinit") from None
    reasons = list(instrumented.reasons) or [
        f"mutable global {g.index} has type {g.valtype}" for g in instrumented.globals
        if g.valtype not in snapshots.NUMERIC
    ]
    if reasons:
        raise InvalidModuleError("the module's state cannot be captured faithfully, so it cannot be "
                                 "pre-initialized: " + "; ".join(reasons), stage="preinit", reasons=reasons)
    return instrumented


class _Kept:
    """A WASI stream kept up to `cap` bytes (the rest counted, not kept). Small on purpose:
    wasmtime holds this callback until the store is freed."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.seen = 0

    def __call__(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        self.seen += len(chunk)
        if room > 0:
            self.data += chunk[:room]


async def stoppable(work: Callable[[], T], stop: Callable[[], None], limiter: anyio.CapacityLimiter) -> T:
    """`work()` in a worker thread; a cancel of the awaiting task calls `stop()` at once, and the
    task still waits for the thread to end (a stopped guest ends at its next epoch tick), so the
    worker slot stays taken until then."""
    finished = False

    async def stop_on_cancel() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            if not finished:
                stop()

    def attempt() -> tuple[Any, Exception | None]:
        try:
            return work(), None
        except Exception as exc:  # carried out of the task group, which would wrap it in an ExceptionGroup
            return None, exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_cancel)
        try:
            value, error = await anyio.to_thread.run_sync(attempt, limiter=limiter)
        finally:
            finished = True
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return value  # type: ignore[no-any-return]
