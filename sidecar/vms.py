"""The VM service: `module.load`, `vm.create`, `vm.call`, `vm.run`, `vm.dispose`, `vm.list`.

Owns the registry of live VMs and the checks that come before a VM exists (the import contract,
declared memories and tables against the store limits, per-VM limits against their ceilings, the
live-VM bound), and turns each request into a job on its VM. Guest work runs on the thread that read the
request; compiles run in a worker thread, never on the event loop and never on a guest's budget.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import structlog
import wasmtime

from protocol.envelope import Notification, encode
from protocol.errors import InvalidModuleError, InvalidParamsError, RpcError, VmNotFoundError
from protocol.methods import (
    Empty,
    ExportInfo,
    ModuleLoadParams,
    ModuleLoadResult,
    Recycles,
    VmCallParams,
    VmCallResult,
    VmCreateParams,
    VmCreateResult,
    VmDisposeParams,
    VmInfo,
    VmListResult,
    VmOutputParams,
    VmRunParams,
    VmRunResult,
    WasiSettings,
)

from . import guest_abi
from .dispatcher import Dispatcher, Reply
from .engines import EngineLease, Engines, EngineSettings
from .guest_abi import CallState
from .isolate import Isolate
from .limits import Limits
from .modules import CompiledModule, ModuleStore, read_source
from .runtime import Runtime
from .snapshot_service import INSTRUMENT_ID, SnapshotMethods, instrument_or_keep
from .vm import Job, Mode, Vm, wasi_config
from .wasmbin import PREFIX
from .wasmffi import set_wasi_stdin_bytes

log = structlog.get_logger()
WASI_MODULE = "wasi_snapshot_preview1"


@dataclass
class Starting:
    """A `runner_vms` slot held by a VM being built; `held` until the VM is live."""

    held: bool = True


class VmService:
    def __init__(self, limits: Limits, runtime: Runtime, modules: ModuleStore, engines: Engines) -> None:
        self.limits = limits
        self.runtime = runtime
        self.modules = modules
        self.engines = engines
        self._vms: dict[str, Vm] = {}
        self._starting = 0  # VMs being built, compile included: they count against runner_vms already
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._compiles = anyio.CapacityLimiter(limits.runner_worker_threads)
        self._snapshots = SnapshotMethods(self)

    def register(self, dispatcher: Dispatcher) -> None:
        dispatcher.route("module.load", "task", self.module_load)
        dispatcher.route("vm.create", "deferred", self.vm_create)
        dispatcher.route("vm.call", "deferred", self.vm_call)
        dispatcher.route("vm.run", "deferred", self.vm_run)
        dispatcher.route("vm.dispose", "inline", self.vm_dispose)
        dispatcher.route("vm.list", "inline", self.vm_list)
        self._snapshots.register(dispatcher)

    def capabilities(self) -> dict[str, Any]:
        return {"guest_abi": guest_abi.VERSION, "snapshot_formats": self._snapshots.formats()}

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
        }

    async def close(self) -> None:
        """Dispose every VM, let running guests stop (the ticker must still run for that), then
        stop the ticker."""
        with self._lock:
            vms = list(self._vms.values())
            self._vms.clear()
        for vm in vms:
            vm.dispose()
        await anyio.to_thread.run_sync(_wait_all_idle, vms, self.limits.protocol_shutdown_ms / 2000)
        self.engines.close()

    # -- methods ---------------------------------------------------------------------------

    async def module_load(self, params: ModuleLoadParams) -> ModuleLoadResult:
        compiled = await anyio.to_thread.run_sync(self._load, params, limiter=self._compiles)
        return ModuleLoadResult(
            module_id=compiled.module_id,
            size_bytes=compiled.size_bytes,
            exports=public_exports(compiled),
            imports=compiled.imports,
            cached=compiled.cached,
            compile_ms=round(compiled.compile_ms, 3),
        )

    def vm_create(self, params: VmCreateParams, reply: Reply) -> None:
        limits = self.limits.tightened(params.limits) if params.limits else self.limits
        settings = EngineSettings.from_limits(limits)
        # The engine the module is compiled for stays until the VM holds it.
        with self.starting() as slot, self.engines.lease(settings) as lease:
            if params.module_id:
                compiled = self.modules.get(params.module_id, settings)
                self._check(compiled, limits)
            else:
                self.runtime.reader.yield_reading()  # a compile can take seconds: let another thread read
                compiled = self.compile(read_source(params, self.limits), limits)
            self.add_vm(slot, lease, compiled, limits, params.mode, params.wasi or WasiSettings(), reply,
                        lambda vm: VmCreateResult(vm_id=vm.vm_id))

    def compile(self, wasm: bytes, limits: Limits) -> CompiledModule:
        """Load a module for VMs with these budgets: instrumented, checked against them."""
        compiled = self.modules.load(
            wasm, EngineSettings.from_limits(limits), transform=instrument_or_keep, transform_id=INSTRUMENT_ID
        )
        self._check(compiled, limits)
        return compiled

    @contextmanager
    def starting(self) -> Iterator[Starting]:
        """Hold a `runner_vms` slot for a VM about to be built (compile included), until `add_vm`
        makes it live or the build ends without one: a VM counts from its first step."""
        with self._lock:
            live = len(self._vms) + self._starting + 1
            if live > self.limits.runner_vms:
                raise self.limits.exceeded("runner_vms", live)
            self._starting += 1
        slot = Starting()
        try:
            yield slot
        finally:
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
        reply: Reply,
        answer: Callable[[Vm], object],
        restore: Callable[[Vm], None] | None = None,
    ) -> Vm | None:
        """A new VM in the `runner_vms` slot held for it; `restore` fills in a snapshot's state.
        `request_lease` is the request's hold on `compiled`'s engine (see `sidecar.engines`): once
        the VM holds its own, it is released, before the host can hear of the VM and ask for more.

        The VM goes live and `answer(vm)` answers `reply` as one decision against a cancel. A
        request cancelled while its VM was built (a compile or a start function cannot always be
        stopped) gets none: the VM is disposed before anyone could list, count or call it (None).
        """
        _check_preopens(wasi)
        with self._lock:
            vm_id = f"vm-{next(self._ids)}"
        lease = self.engines.hold(compiled.settings, compiled.engine)
        request_lease.release()
        try:
            vm = Vm(vm_id, compiled, lease, limits, mode, wasi, self.runtime, start=restore is None)
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
            return result

        if not reply.result_of(go_live):
            vm.dispose()
            log.info("vm_discarded", vm_id=vm_id, reason="request cancelled")
            return None
        log.info("vm_created", vm_id=vm_id, module_id=compiled.module_id, mode=mode)
        return vm

    def vm_call(self, params: VmCallParams, reply: Reply) -> None:
        vm = self.find(params.vm_id)
        if params.export.startswith(PREFIX):
            raise InvalidParamsError(f"exports named {PREFIX}* belong to the sidecar", path="$.export")
        data = _payload(params.input, params.input_base64)
        budget = vm.budget
        if len(data) > budget.input_bytes:
            raise vm.limits.exceeded("vm_input_bytes", len(data), vm_id=vm.vm_id)
        timeout_ms = _timeout(params.timeout_ms, vm.limits)

        def work(vm: Vm, isolate: Isolate | None, state: CallState) -> VmCallResult:
            if isolate is None:
                raise InvalidParamsError("this VM holds a WASI command: use vm.run", path="$.vm_id")
            state.input = data
            state.output_cap = budget.output_bytes
            started = time.perf_counter()
            state.deadline = time.monotonic() + timeout_ms / 1000
            results = isolate.call(params.export, params.args, state, timeout_ms)
            elapsed = (time.perf_counter() - started) * 1000
            text, binary = _text_or_base64(state.output)
            return VmCallResult(
                results=results,
                output=text,
                output_base64=binary,
                elapsed_ms=round(elapsed, 3),
                fuel_used=isolate.fuel_used(budget.fuel) if budget.fuel else msgspec.UNSET,
            )

        vm.submit(Job(reply, work))

    def vm_run(self, params: VmRunParams, reply: Reply) -> None:
        vm = self.find(params.vm_id)
        if not vm.compiled.command:
            raise InvalidParamsError("the VM's module exports no `_start`: use vm.call", path="$.vm_id")
        stdin = _payload(params.stdin, params.stdin_base64)
        if len(stdin) > vm.limits.vm_input_bytes:
            raise vm.limits.exceeded("vm_input_bytes", len(stdin), vm_id=vm.vm_id)
        timeout_ms = _timeout(params.timeout_ms, vm.limits)
        stream_to = reply.id if params.stream else None

        def work(vm: Vm, _: Isolate | None, state: CallState) -> VmRunResult:
            cap = vm.limits.vm_output_bytes
            stdout = _Capture(cap, vm, "stdout", stream_to, self.runtime)
            stderr = _Capture(cap, vm, "stderr", stream_to, self.runtime)
            config = _wasi_config(vm.wasi, params, stdin, stdout, stderr)
            state.deadline = time.monotonic() + timeout_ms / 1000
            started = time.perf_counter()
            self.runtime.reader.yield_reading()  # a whole program: do not hold the host's input meanwhile
            isolate = vm.isolate_for(config)
            try:
                code = isolate.run_start(state, timeout_ms)
            finally:
                isolate.close()
            for capture in (stdout, stderr):
                capture.report()
            out_text, out_binary = _text_or_base64(bytes(stdout.data))
            err_text, err_binary = _text_or_base64(bytes(stderr.data))
            return VmRunResult(
                exit_code=code,
                stdout=out_text,
                stdout_base64=out_binary,
                stderr=err_text,
                stderr_base64=err_binary,
                stdout_truncated=stdout.truncated,
                stderr_truncated=stderr.truncated,
                elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
            )

        vm.submit(Job(reply, work))

    def vm_dispose(self, params: VmDisposeParams) -> Empty:
        with self._lock:
            vm = self._vms.pop(params.vm_id, None)
        if vm is None:
            raise VmNotFoundError(params.vm_id)
        vm.dispose()
        log.info("vm_disposed", vm_id=params.vm_id, calls=vm.calls)
        return Empty()

    def vm_list(self, _: Empty) -> VmListResult:
        with self._lock:
            vms = list(self._vms.values())
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
                )
                for vm in vms
            ]
        )

    # -- checks ----------------------------------------------------------------------------

    def _load(self, params: ModuleLoadParams) -> CompiledModule:
        return self.compile(read_source(params, self.limits), self.limits)

    def find(self, vm_id: str) -> Vm:
        vm = self._vms.get(vm_id)
        if vm is None:
            raise VmNotFoundError(vm_id)
        return vm

    def _check(self, compiled: CompiledModule, limits: Limits) -> None:
        self._check_imports(compiled)
        self._check_declared(compiled, limits)

    def _check_imports(self, compiled: CompiledModule) -> None:
        """Refuse, naming it, any import the sidecar does not provide with that signature."""
        for item in compiled.imports:
            if item.module == WASI_MODULE:
                continue
            expected = guest_abi.SIGNATURES.get(item.name) if item.module == guest_abi.MODULE else None
            if expected is None or item.kind != "func":
                raise InvalidModuleError(
                    f"the module imports {item.module}.{item.name}, which the sidecar does not provide",
                    stage="imports",
                    module=item.module,
                    name=item.name,
                )
            if (tuple(item.params or ()), tuple(item.results or ())) != expected:
                raise InvalidModuleError(
                    f"{item.module}.{item.name} is imported with the wrong signature",
                    stage="imports",
                    module=item.module,
                    name=item.name,
                    expected={"params": list(expected[0]), "results": list(expected[1])},
                )

    def _check_declared(self, compiled: CompiledModule, limits: Limits) -> None:
        """Refuse, naming the limit, a module whose declared memories or tables exceed a store
        limit: wasmtime refuses those at instantiation with a generic error. `vm_instances` needs
        no check: every store instantiates exactly one module."""
        memories, tables = compiled.memory_minimums, compiled.table_minimums
        for name, observed in (
            ("vm_memory_bytes", max(memories, default=0)),
            ("vm_memories", len(memories)),
            ("vm_tables", len(tables)),
            ("vm_table_elements", max(tables, default=0)),
        ):
            if observed > getattr(limits, name):
                raise limits.exceeded(name, observed, module_id=compiled.module_id)

def _wait_all_idle(vms: list[Vm], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    for vm in vms:
        if not vm.wait_idle(max(0.0, deadline - time.monotonic())):
            log.warning("vm_still_running_at_shutdown", vm_id=vm.vm_id)


class _Capture:
    """A WASI stream kept up to `vm_output_bytes` (the rest counted, not kept), or streamed."""

    def __init__(self, cap: int, vm: Vm, stream: str, request_id: Any, runtime: Runtime) -> None:
        self.cap = cap
        self.data = bytearray()
        self.seen = 0
        self._vm_id = vm.vm_id
        self._limits = vm.limits
        self._stream = stream
        self._request_id = request_id
        self._runtime = runtime

    @property
    def truncated(self) -> bool:
        return self.seen > self.cap

    def __call__(self, chunk: bytes) -> None:
        room = self.cap - self.seen
        self.seen += len(chunk)
        if room <= 0:
            return
        kept = chunk[:room]
        if self._request_id is None:
            self.data += kept
            return
        text, binary = _text_or_base64(kept)
        params = VmOutputParams(vm_id=self._vm_id, stream=self._stream, data=text, data_base64=binary,  # type: ignore[arg-type]
                                request_id=self._request_id)
        self._runtime.send(encode(Notification(method="vm.output", params=params)))

    def report(self) -> None:
        if self.truncated:
            self._limits.exhausted("vm_output_bytes", self.seen, capacity=self.cap, vm_id=self._vm_id,
                                   stream=self._stream)


def public_exports(compiled: CompiledModule) -> list[ExportInfo]:
    """The module's own exports: the `__sidecar_*` ones our instrumentation added are not the guest's."""
    return [export for export in compiled.exports if not export.name.startswith(PREFIX)]


def _wasi_config(
    wasi: WasiSettings, params: VmRunParams, stdin: bytes, stdout: _Capture, stderr: _Capture
) -> wasmtime.WasiConfig:
    config = wasi_config(wasi, params.args, params.env)
    set_wasi_stdin_bytes(config, stdin)
    config.stdout_custom = stdout
    config.stderr_custom = stderr
    return config


def _check_preopens(wasi: WasiSettings) -> None:
    for index, preopen in enumerate(wasi.preopens):
        if not os.path.isdir(preopen.host_path):
            raise InvalidParamsError(
                f"preopen {preopen.host_path!r} is not a directory", path=f"$.wasi.preopens[{index}].host_path"
            )


def _payload(text: Any, binary: Any) -> bytes:
    if isinstance(text, str):
        return text.encode()
    return binary if isinstance(binary, bytes) else b""


def _timeout(requested: Any, limits: Limits) -> int:
    """A per-request `timeout_ms` tightens `vm_call_timeout_ms`, never raises it."""
    if not isinstance(requested, int):
        return limits.vm_call_timeout_ms
    if requested > limits.timer_max_ms:
        raise InvalidParamsError(f"timeout_ms above timer_max_ms ({limits.timer_max_ms})", path="$.timeout_ms")
    return min(requested, limits.vm_call_timeout_ms)


def _text_or_base64(data: bytes) -> tuple[Any, Any]:
    if not data:
        return "", msgspec.UNSET
    try:
        return data.decode("utf-8"), msgspec.UNSET
    except UnicodeDecodeError:
        return msgspec.UNSET, data


def vm_service(server: Any) -> VmService:
    """The service as the server builds it, once its outbox, host calls and intake exist."""
    engines = Engines(server.limits)
    engines.start()
    intake = server.intake
    runtime = Runtime(server.hostcalls, intake, server.outbox.send)
    return VmService(server.limits, runtime, ModuleStore(server.limits, engines), engines)
