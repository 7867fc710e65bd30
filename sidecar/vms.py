"""The VM registry and its methods: `module.load`, `vm.create`, `vm.call`, `vm.dispose`, `vm.list`.

Owns the registry of live VMs (and of those being built, which count against `runner_vms` from
their first step), creating a VM once `sidecar.admission` passed its module, and turning each call
into a job on its VM. Guest work runs on the thread that read the request; compiles run in a
worker thread, never on the event loop and never on a guest's budget. Either method may first
pre-initialize its module (`preinit`, run by `sidecar.preinit`); a cancel stops that run. Other
services reach VMs through `find`, `starting` and `add_vm` (runs, snapshots); this module knows
nothing of them.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import msgspec
import structlog

from protocol.errors import InvalidParamsError, RpcError, VmNotFoundError
from protocol.methods import (
    Empty,
    ExportInfo,
    ModuleLoadParams,
    ModuleLoadResult,
    PreinitSpec,
    Recycles,
    VmCallParams,
    VmCallResult,
    VmCreateParams,
    VmCreateResult,
    VmDisposeParams,
    VmInfo,
    VmListResult,
    WasiSettings,
)

from .admission import Starting, check_module, check_preopens
from .completion import Completion
from .engines import EngineLease, Engines, EngineSettings
from .evals import runtime_create_params, runtime_warm_up
from .guest_abi import CallState
from .isolate import Isolate
from .job import Job
from .limits import Limits
from .modules import INSTRUMENT_ID, CompiledModule, ModuleStore, Source, instrument_or_keep
from .payloads import call_timeout, payload, text_or_base64
from .preinit import Preinit, PreinitRuns, stoppable
from .residency import NoResidency, Residency, resident, rfc3339
from .runtime import Runtime
from .spares import Spares
from .vm import Mode, Vm
from .wasmbin import PREFIX

log = structlog.get_logger()


class VmService:
    def __init__(self, limits: Limits, runtime: Runtime, modules: ModuleStore, engines: Engines) -> None:
        self.limits = limits
        self.runtime = runtime
        self.modules = modules
        self.engines = engines
        self._vms: dict[str, Vm] = {}
        self._starting = 0  # VMs being built, compile included: they count against runner_vms already
        self._lock = threading.Lock()
        self._preinits = PreinitRuns()  # `close` stops them while the ticker still runs
        self._ids = itertools.count(1)
        self._compiles = anyio.CapacityLimiter(limits.runner_worker_threads)
        self.residency: Residency = NoResidency()
        self._settings = EngineSettings.from_limits(limits)  # most VMs': made once (~1.3 µs)
        self.spares = Spares(limits, runtime)
        engines.on_evicted(self.spares.forget_engine)

    def routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        return [
            ("module.load", "task", self.module_load),
            ("vm.create", "deferred", self.vm_create),
            ("vm.call", "deferred", self.vm_call),
            ("vm.dispose", "inline", self.vm_dispose),
            ("vm.list", "inline", self.vm_list),
        ]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            vms = list(self._vms.values())
        recycles: Counter[str] = Counter()
        for vm in vms:
            recycles.update(vm.recycles)
        return {
            "engines": len(self.engines),
            "vms": len(vms),
            "vms_starting": self._starting,
            "vm_calls": sum(vm.calls for vm in vms),
            "vm_memory_bytes": sum(vm.memory_bytes for vm in vms),
            "instances_recycled": Recycles.of(recycles),
            "spare_instances": len(self.spares),
        }

    async def close(self) -> None:
        """Dispose every VM and stop every pre-initialization, let running guests stop (the ticker
        must still run for that), then stop the ticker."""
        with self._lock:
            vms = list(self._vms.values())
            self._vms.clear()
        for vm in vms:
            vm.dispose()
        self.spares.close()
        self._preinits.stop_all()
        await anyio.to_thread.run_sync(self._wait_all_idle, vms, self.limits.protocol_shutdown_ms / 2000)
        self.engines.close()

    # -- methods ---------------------------------------------------------------------------

    async def module_load(self, params: ModuleLoadParams) -> ModuleLoadResult:
        run = Preinit(params.preinit, self.limits, self.runtime) if isinstance(params.preinit, PreinitSpec) else None
        if run is None:
            compiled = await anyio.to_thread.run_sync(self._load, params, limiter=self._compiles)
        else:
            with self._preinits.tracked(run):
                compiled = await stoppable(partial(self._preinitialize, params, run), run.stop, self._compiles)
        return ModuleLoadResult(
            module_id=compiled.module_id,
            size_bytes=compiled.size_bytes,
            exports=public_exports(compiled),
            imports=compiled.imports,
            cached=compiled.cached,
            compile_ms=round(compiled.compile_ms if run is None else run.compile_ms, 3),
            **_preinit_fields(compiled, run),
        )

    def vm_create(self, params: VmCreateParams, reply: Completion) -> None:
        runtime_name = params.runtime if isinstance(params.runtime, str) else None
        params, source_id = runtime_create_params(params) if runtime_name is not None else (params, None)
        limits = self.limits.tightened(params.limits) if params.limits else self.limits
        if runtime_name is not None and params.mode == "stateless":
            limits = limits.tightened({"vm_recycle_after_calls": 1})  # every eval a pristine interpreter
        settings = self._settings if limits is self.limits else EngineSettings.from_limits(limits)
        run = None
        # The engine the module is compiled for stays until the VM holds it.
        with self.starting() as slot, self.engines.lease(settings) as lease:
            if isinstance(params.preinit, PreinitSpec):
                self.runtime.reader.yield_reading()  # a compile and a run: let another thread read
                run = Preinit(params.preinit, limits, self.runtime)
                reply.on_cancel = run.stop
                if reply.done:  # cancelled before the hook was in place
                    run.stop()
                with self._preinits.tracked(run):
                    compiled = self._preinitialize(params, run, source_id)
            elif params.module_id:
                compiled = self.modules.get(params.module_id, settings)
                check_module(compiled, limits)
            else:
                self.runtime.reader.yield_reading()  # a compile can take seconds: let another thread read
                compiled = self.compile(self.modules.source(params), limits)
            self.add_vm(slot, lease, compiled, limits, params.mode, params.wasi or WasiSettings(), reply,
                        lambda vm: VmCreateResult(vm_id=vm.vm_id, **_preinit_fields(compiled, run, module_id=True)),
                        runtime_name=runtime_name)

    def _preinitialize(self, params: ModuleLoadParams | VmCreateParams, run: Preinit,
                       source_id: str | None = None) -> CompiledModule:
        """The module `params` names (a source, or a `module_id` loaded before), pre-initialized by
        `run` for VMs with `run.limits` and checked against them: from a cache when it has the bake,
        in which case a source is not even compiled, nor read when its id is known (`source_id`: a
        runtime's, from its manifest; the bytes must then have that id to be baked)."""
        limits = run.limits
        check_preopens(run.wasi, path="$.preinit.wasi")
        module_id = getattr(params, "module_id", None)
        if isinstance(module_id, str):
            base = self.modules.get(module_id, EngineSettings.from_limits(limits))  # refuses an unknown id now
            check_module(base, limits)
            baked = run.obtain(self.modules, module_id, lambda: base)
        else:
            source = None if source_id else self.modules.source(params)
            base_id = source_id or source.module_id  # type: ignore[union-attr]

            def base() -> CompiledModule:
                wasm = source if source is not None else self.modules.source(params)
                if wasm.module_id != base_id:
                    raise InvalidParamsError(f"the runtime's module is not the one its manifest names ({base_id}): "
                                             "reinstall it (wasm-sidecar runtime install --force)", path="$.runtime")
                return self.compile(wasm, limits)

            baked = run.obtain(self.modules, base_id, base)
        check_module(baked, limits)
        return baked

    def runtime_module(self, name: str, limits: Limits) -> CompiledModule:
        """Runtime `name`'s baked module for VMs with these budgets (from the caches when it was made)."""
        params, source_id = runtime_create_params(VmCreateParams(runtime=name))  # type: ignore[arg-type]
        return self._preinitialize(params, Preinit(params.preinit, limits, self.runtime),  # type: ignore[arg-type]
                                   source_id)

    def compile(self, wasm: bytes | Source, limits: Limits) -> CompiledModule:
        """Load a module for VMs with these budgets: instrumented, checked against them."""
        compiled = self.modules.load(
            wasm, EngineSettings.from_limits(limits), transform=instrument_or_keep, transform_id=INSTRUMENT_ID
        )
        check_module(compiled, limits)
        return compiled

    def starting(self) -> Starting:
        """Hold a `runner_vms` slot for a VM about to be built (compile included), until `add_vm`
        makes it live or the build ends without one (`with`): a VM counts from its first step."""
        with self._lock:
            live = len(self._vms) + self._starting + 1
            if live > self.limits.runner_vms:
                raise self.limits.exceeded("runner_vms", live)
            self._starting += 1
        return Starting(self._started)

    def _started(self, slot: Starting) -> None:
        with self._lock:
            if slot.held:
                self._starting -= 1

    def add_vm(
        self,
        slot: Starting,
        request_lease: EngineLease,
        compiled: CompiledModule,
        limits: Limits,
        mode: Mode,
        wasi: WasiSettings,
        reply: Completion,
        answer: Callable[[Vm], object],
        restore: Callable[[Vm], None] | None = None,
        runtime_name: str | None = None,
        vm_id: str | None = None,
        asleep: bool = False,
    ) -> Vm | None:
        """A new VM in the `runner_vms` slot held for it; `restore` fills in a snapshot's state
        (into its instance, or, `asleep`, into what revives it: see `sidecar.hibernation`).
        `request_lease` is the request's hold on `compiled`'s engine (see `sidecar.engines`): once
        the VM holds its own, it is released, before the host can hear of the VM and ask for more.

        The VM goes live and `answer(vm)` answers `reply` as one decision against a cancel. A
        request cancelled while its VM was built (a compile or a start function cannot always be
        stopped) gets none: the VM is disposed before anyone could list, count or call it (None).
        `vm_id`: the id of a VM found hibernated by an earlier process, kept for life.
        """
        check_preopens(wasi)
        if vm_id is None:
            with self._lock:
                vm_id = f"vm-{next(self._ids)}"
        lease = self.engines.hold(compiled.settings, compiled.engine)
        request_lease.release()
        fresh = restore is None and not asleep and runtime_name is None  # a spare fits only a VM starting afresh
        try:
            vm = Vm(vm_id, compiled, lease, limits, mode, wasi, self.runtime, start=restore is None, asleep=asleep,
                    runtime_name=runtime_name, prepare=runtime_warm_up(runtime_name),
                    spare=self.spares.take(compiled, limits, wasi) if fresh else None)
        except BaseException as exc:
            lease.release()  # no VM exists to release it
            if isinstance(exc, RpcError):  # e.g. its start function trapped: no VM exists to name
                exc.details.pop("vm_id", None)
            raise
        if restore is not None:
            try:
                restore(vm)
            except BaseException:
                vm.dispose()
                raise

        def go_live() -> object:
            result = answer(vm)
            with self._lock:  # from starting to live in one step: counted once throughout
                self._vms[vm_id] = vm
                self._starting -= 1
                slot.held = False
            self.residency.joined(vm)
            return result

        if not reply.result_of(go_live):
            vm.dispose()
            log.info("vm_discarded", vm_id=vm_id, reason="request cancelled")
            return None
        log.info("vm_created", vm_id=vm_id, module_id=compiled.module_id, mode=mode)
        self.residency.went_live(vm)
        if fresh:
            self.spares.refill(compiled, limits, wasi)  # for the next VM like it, now that the answer is out
        return vm

    def vm_call(self, params: VmCallParams, reply: Completion) -> None:
        vm = self.find(params.vm_id)
        if params.export.startswith(PREFIX):
            raise InvalidParamsError(f"exports named {PREFIX}* belong to the sidecar", path="$.export")
        data = payload(params.input, params.input_base64)
        budget = vm.budget
        if len(data) > budget.input_bytes:
            raise vm.limits.exceeded("vm_input_bytes", len(data), vm_id=vm.vm_id)
        timeout_ms = call_timeout(params.timeout_ms, vm.limits)

        def work(vm: Vm, isolate: Isolate | None, state: CallState) -> VmCallResult:
            if isolate is None:
                raise InvalidParamsError("this VM holds a WASI command: use vm.run", path="$.vm_id")
            state.input = data
            state.output_cap = budget.output_bytes
            started = time.perf_counter()
            state.deadline = time.monotonic() + timeout_ms / 1000
            results = isolate.call(params.export, params.args, state, timeout_ms)
            elapsed = (time.perf_counter() - started) * 1000
            text, binary = text_or_base64(state.output)
            return VmCallResult(
                results=results,
                output=text,
                output_base64=binary,
                elapsed_ms=round(elapsed, 3),
                fuel_used=isolate.fuel_used(budget.fuel) if budget.fuel else msgspec.UNSET,
            )

        vm.submit(Job(reply, work))

    def vm_dispose(self, params: VmDisposeParams) -> Empty:
        with self._lock:
            vm = self._vms.pop(params.vm_id, None)
        if vm is None:
            raise VmNotFoundError(params.vm_id)
        vm.dispose()
        self.residency.disposed(vm)
        log.info("vm_disposed", vm_id=params.vm_id, calls=vm.calls)
        return Empty()

    def vm_list(self, _: Empty) -> VmListResult:
        with self._lock:
            vms = list(self._vms.values())
        now, wall = time.monotonic(), time.time()
        return VmListResult(
            vms=[
                VmInfo(
                    vm_id=vm.vm_id,
                    mode=vm.mode,  # type: ignore[arg-type]
                    module_id=vm.compiled.module_id,
                    state="busy" if vm.busy else "idle",
                    memory_bytes=vm.memory_bytes,
                    calls=vm.calls,
                    instances=vm.instances,
                    host_calls_pending=self.runtime.hostcalls.pending_for(vm.vm_id),
                    recycles=Recycles.of(vm.recycles),
                    resident=resident(vm),
                    last_used=rfc3339(wall - (now - vm.last_used)),
                )
                for vm in vms
            ]
        )

    def _wait_all_idle(self, vms: list[Vm], within_s: float) -> None:
        deadline = time.monotonic() + within_s
        for vm in vms:
            if not vm.wait_idle(max(0.0, deadline - time.monotonic())):
                log.warning("vm_still_running_at_shutdown", vm_id=vm.vm_id)
        if not self._preinits.wait_ended(max(0.0, deadline - time.monotonic())):
            log.warning("preinit_still_running_at_shutdown")

    # -- for other services -----------------------------------------------------------------

    def find(self, vm_id: str) -> Vm:
        vm = self._vms.get(vm_id)
        if vm is None:
            raise VmNotFoundError(vm_id)
        return vm

    def claim_ids(self, vm_ids: list[str]) -> None:
        """Issue new ids past these (VMs of an earlier process), so that none collides with them."""
        numbers = [int(vm_id[3:]) for vm_id in vm_ids if vm_id.startswith("vm-") and vm_id[3:].isdigit()]
        with self._lock:
            self._ids = itertools.count(max([*numbers, next(self._ids) - 1]) + 1)

    def _load(self, params: ModuleLoadParams) -> CompiledModule:
        """On a worker thread: the module, and a spare for its first `vm.create` (a host loads to create)."""
        compiled = self.compile(self.modules.source(params), self.limits)
        self.spares.refill(compiled, self.limits, WasiSettings())
        return compiled


def _preinit_fields(compiled: CompiledModule, run: Preinit | None, *, module_id: bool = False) -> dict[str, Any]:
    """The result fields contract v1.1 adds after a `preinit` (`module_id`: for `vm.create`)."""
    if run is None:
        return {}
    fields = {"preinit_ms": round(run.preinit_ms, 3), "preinit_cached": compiled.cached}
    return {"module_id": compiled.module_id, **fields} if module_id else fields


def public_exports(compiled: CompiledModule) -> list[ExportInfo]:
    """The module's own exports: the `__sidecar_*` ones our instrumentation added are not the guest's."""
    return [export for export in compiled.exports if not export.name.startswith(PREFIX)]
