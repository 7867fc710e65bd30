"""`vm.snapshot` and `vm.restore`: parking a VM in a file and resuming it in any sidecar.

Owns the two methods and the instrumentation facts of loaded modules (whether, and how, a module
can be snapshotted; the rewrite itself runs at load, in `sidecar.modules`). A snapshot is taken
as a job on the VM, so it never sees a guest mid-call; a VM with guest frames on its stack (a
call running, a guest blocked in `host_call`) is refused instead of waited for, since the answer
it waits on may itself wait for the snapshot. A restore builds a VM from the file's module
(through the compile cache), writes the state into a fresh instance without running its start
function, and makes its pending async host calls live again under their ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from protocol.errors import (
    GuestTrapError,
    InvalidModuleError,
    InvalidParamsError,
    InvalidSnapshotError,
    LimitExceededError,
    RpcError,
    env_var_for,
)
from protocol.methods import (
    PendingHostCall,
    VmRestoreParams,
    VmRestoreResult,
    VmSnapshotParams,
    VmSnapshotResult,
    WasiSettings,
)

from . import __version__, runtimes, snapshot_file, snapshots
from .completion import Completion
from .engines import EngineLease, Engines, EngineSettings
from .evals import runtime_view
from .guest_abi import CallState
from .hostcalls import AsyncCall
from .hostfiles import write_atomically
from .isolate import Isolate
from .job import Job
from .limits import Limits
from .modules import INSTRUMENT_ID, CompiledModule
from .runtime import Runtime
from .snapshot_file import PendingCall, SnapshotState
from .vm import Vm
from .vms import Starting, VmService
from .wasmbin import Instrumented, WasmFormatError, instrument

log = structlog.get_logger()
_FACTS_ID = "sidecar-facts-1"  # names the form of `Instrumented` kept in compile-cache notes


def _restored_wasi(saved: dict, given: WasiSettings | msgspec.UnsetType) -> WasiSettings:
    """The WASI view of a restored VM. A snapshot file is untrusted, so it never grants access to
    host directories: its args and env are kept, its preopens are dropped, and a host that wants
    directories (or another view) passes `wasi` to `vm.restore`."""
    if isinstance(given, WasiSettings):
        return given
    return msgspec.structs.replace(msgspec.convert(saved, WasiSettings), preopens=[])


class SnapshotService:
    """Works on VMs through the registry's public face: `find`, `starting`, `compile`, `add_vm`."""

    def __init__(self, vms: VmService, runtime: Runtime, engines: Engines, limits: Limits) -> None:
        self._vms = vms
        self._runtime = runtime
        self._engines = engines
        self._limits = limits
        self._instrumented: OrderedDict[str, Instrumented] = OrderedDict()
        self._lock = threading.Lock()
        # Each format vm.snapshot writes, from an idle VM's instance (within a job on the VM).
        self._writers: dict[str, Callable[[Vm, Isolate, Instrumented], snapshot_file.Encoded]] = {
            "state": lambda vm, isolate, instrumented: snapshot_file.encode_parts(
                self.state_of(vm, isolate, instrumented)),
            "wasm": lambda _, isolate, instrumented: snapshot_file.Encoded.of(
                snapshots.to_wasm(instrumented, *snapshots.capture(isolate, instrumented, borrow=True))),
        }

    def routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        return [("vm.snapshot", "deferred", self.vm_snapshot), ("vm.restore", "deferred", self.vm_restore)]

    def stats(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        pass  # the VMs it made belong to the registry, which disposes them

    def vm_snapshot(self, params: VmSnapshotParams, reply: Completion) -> None:
        vm = self._vms.find(params.vm_id)
        instrumented = self.snapshottable(vm)
        path = Path(params.path)

        def work(vm: Vm, isolate: Isolate | None, state: CallState) -> VmSnapshotResult:
            assert isolate is not None
            self._runtime.reader.yield_reading()  # capturing and writing a big memory takes a while
            encoded = self._writers[params.format](vm, isolate, instrumented)
            size = encoded.size
            if size > vm.limits.runner_snapshot_bytes:
                raise vm.limits.exceeded("runner_snapshot_bytes", size, vm_id=vm.vm_id)
            try:
                write_atomically(path, encoded.parts)
            except OSError as exc:
                raise InvalidParamsError(f"cannot write {path}: {exc.strerror}", path="$.path") from None
            log.info("vm_snapshotted", vm_id=vm.vm_id, path=str(path), format=params.format, size=size)
            return VmSnapshotResult(path=str(path), size_bytes=size, sha256=encoded.sha256)

        vm.submit(Job(reply, work))

    def snapshottable(self, vm: Vm) -> Instrumented:
        """The instrumentation facts of a VM whose state can be captured now; -32602 if it cannot."""
        if vm.mode != "stateful" or vm.compiled.command:
            raise InvalidParamsError("only stateful VMs that keep an instance hold state to snapshot", path="$.vm_id")
        if vm.in_guest:
            raise InvalidParamsError(
                "the VM has guest frames on its stack (a call is running or waits on the host); "
                "snapshot it when it is idle", path="$.vm_id", state="busy",
            )
        try:
            instrumented = self.instrumented(vm.compiled)
        except WasmFormatError as exc:
            raise InvalidParamsError(f"this VM's module cannot be snapshotted: {exc}", path="$.vm_id") from None
        snapshots.require_snapshottable(instrumented)
        return instrumented

    def state_of(self, vm: Vm, isolate: Isolate, instrumented: Instrumented, *,
                 embed_module: bool = True) -> SnapshotState:
        """The `state` of an idle VM, as a job on the VM that is done with it before the job ends (its
        memories are views into the instance's). Memories are stored as what differs from the memory
        a fresh instance of the module starts with (a bake's state is stored once, in the module),
        compared where it lies, mapped copy-on-write. Without `embed_module`, the module is named by
        its id alone and the reader must find it (`snapshot_file.parse`)."""
        fresh = vm.isolate_for(start=False)
        try:
            baseline = snapshots.memory_views(fresh, instrumented)
            memories, globals_ = snapshots.capture(isolate, instrumented, baseline, borrow=True)
        finally:
            fresh.close()
        state = self._state(vm, memories, globals_)
        return state if embed_module else msgspec.structs.replace(state, module=b"")

    def vm_restore(self, params: VmRestoreParams, reply: Completion) -> None:
        self._runtime.reader.yield_reading()  # reading a file and maybe compiling: let another thread read input
        with self._vms.starting() as slot:
            self._restore(params, slot, reply)

    def _restore(self, params: VmRestoreParams, slot: Starting, reply: Completion) -> None:
        state = snapshot_file.read(Path(params.path), self._limits.runner_snapshot_bytes)
        vm = self.resume(state, slot, reply, wasi=params.wasi, limits=params.limits or None)
        if vm is not None:
            log.info("vm_restored", vm_id=vm.vm_id, path=params.path, pending=len(state.pending_host_calls))

    def resume(self, state: SnapshotState, slot: Starting, reply: Completion, *,
               wasi: WasiSettings | msgspec.UnsetType = msgspec.UNSET, limits: dict | None = None,
               vm_id: str | None = None, revive: Callable[[Vm], Isolate] | None = None) -> Vm | None:
        """A live VM holding `state`, answered on `reply` (None: cancelled meanwhile). `wasi` and
        `limits` as `vm.restore` takes them. With `revive`, the VM (of an earlier process, under its
        old `vm_id`) starts hibernated: no instance until a job needs one, which `revive` makes."""
        overrides = limits
        try:
            limits = self._limits.tightened(state.limits) if state.limits else self._limits
            wasi = _restored_wasi(state.wasi, wasi)
        except (RpcError, msgspec.ValidationError) as exc:
            raise InvalidSnapshotError(f"snapshot settings do not fit this sidecar: {exc}", stage="bounds") from None
        if overrides:
            limits = limits.tightened(overrides)
        if state.runtime is not None:
            wasi = self._runtime_view(state.runtime, wasi)
        if len(state.pending_host_calls) > limits.vm_host_calls_in_flight:
            raise InvalidSnapshotError("more pending host calls than vm_host_calls_in_flight", stage="bounds",
                                       limit="vm_host_calls_in_flight", capacity=limits.vm_host_calls_in_flight,
                                       observed=len(state.pending_host_calls))
        live = [call.id for call in state.pending_host_calls if self._runtime.hostcalls.is_pending(call.id)]
        if live:
            raise InvalidSnapshotError(
                "a VM of this sidecar still waits on this snapshot's host calls; dispose it first",
                stage="pending", ids=live,
            )
        capacity = self._limits.runner_module_bytes
        if len(state.module) > capacity:
            raise InvalidSnapshotError(
                f"the embedded module of {len(state.module)} bytes is larger than runner_module_bytes ({capacity})",
                stage="bounds", limit="runner_module_bytes", env=env_var_for("runner_module_bytes"),
                capacity=capacity, observed=len(state.module),
            )
        try:
            # As in vm.create: the engine the module is compiled for stays until the VM holds it.
            with self._engines.lease(EngineSettings.from_limits(limits)) as lease:
                return self._build(slot, lease, state, limits, wasi, reply, vm_id, revive)
        except RpcError as exc:
            raise _as_invalid_snapshot(exc, self._limits) from None

    def _build(self, slot: Starting, lease: EngineLease, state: SnapshotState, limits: Limits, wasi: WasiSettings,
               reply: Completion, vm_id: str | None, revive: Callable[[Vm], Isolate] | None) -> Vm | None:
        """A live VM holding the snapshot's state, answered on `reply` (None: cancelled meanwhile).
        What goes wrong is told in the sidecar's own errors (an import that does not resolve, a trap
        at instantiation, a budget), which the caller turns into the file's fault."""
        compiled = self._module_of(state, limits)
        if compiled.command:
            raise InvalidSnapshotError(
                "the embedded module is a WASI command (it exports `_start`): each run starts afresh, "
                "so a command has no state to restore", stage="module",
            )
        try:
            instrumented = self.instrumented(compiled)
        except WasmFormatError as exc:
            raise InvalidSnapshotError(f"the embedded module cannot be instrumented: {exc}", stage="module") from None
        if not instrumented.snapshottable:
            raise InvalidSnapshotError("the snapshot's module cannot be restored faithfully", stage="module",
                                       reasons=list(instrumented.reasons))

        def build(vm: Vm) -> None:
            if revive is None:
                isolate = vm.idle_instance()
                snapshots.apply(isolate, instrumented, state.memories, state.globals, limits,
                                diffed=state.baseline is not None)
                isolate.refresh_memory()
            vm.revive = revive
            vm.next_ticket = state.next_ticket
            for call in state.pending_host_calls:
                if not vm.adopt_async(call.ticket, AsyncCall(call.id, call.method, call.params)):
                    raise InvalidSnapshotError("a pending host call is live in this sidecar", stage="pending",
                                               ids=[call.id])

        def answer(vm: Vm) -> VmRestoreResult:
            return VmRestoreResult(
                vm_id=vm.vm_id,
                pending_host_calls=[
                    PendingHostCall(id=call.id, method=call.method, params=msgspec.Raw(call.params))
                    for call in state.pending_host_calls
                ],
            )

        return self._vms.add_vm(slot, lease, compiled, limits, state.mode, wasi, reply, answer, restore=build,
                                runtime_name=state.runtime, vm_id=vm_id, asleep=revive is not None)

    def _module_of(self, state: SnapshotState, limits: Limits) -> CompiledModule:
        """The snapshot's module: the one it embeds, or (a runtime VM's) the runtime's bake, which
        must be the very module the snapshot was taken of."""
        if state.module or state.runtime is None:
            return self._vms.compile(state.module, limits)
        compiled = self._vms.runtime_module(state.runtime, limits)
        if compiled.module_id != state.module_id:
            stored = " (its memory is stored as changes to that build's state)" if state.baseline else ""
            raise InvalidSnapshotError(
                f"the snapshot is of another build of the {state.runtime} runtime than this sidecar has{stored}",
                stage="module", expected=state.module_id, found=compiled.module_id,
            )
        return compiled

    @staticmethod
    def _runtime_view(name: str, wasi: WasiSettings) -> WasiSettings:
        """A runtime session's view: the runtime's files come from this installation, never the file."""
        runtime = runtimes.find(name)
        if runtime is None:
            raise InvalidSnapshotError(
                f"the snapshot is of a {name} VM and this sidecar has no {name} runtime "
                f"(install it with: wasm-sidecar runtime install {name})", stage="module", runtime=name,
            )
        return runtime_view(runtime, wasi)

    def instrumented(self, compiled: CompiledModule) -> Instrumented:
        """The instrumentation facts of a loaded module (instrumenting is idempotent); a module our
        rewriter cannot read (kept uninstrumented at load) raises WasmFormatError. Kept here and as
        a note in the compile cache: a restore in a fresh process does not scan a CPython again."""
        with self._lock:
            found = self._instrumented.get(compiled.module_id)
        if found is None:
            cache = self._vms.modules.cache
            # Every module is loaded through the same rewrite, so its id and that rewrite name its bytes.
            key = hashlib.sha256(f"{_FACTS_ID}:{INSTRUMENT_ID}:{compiled.module_id}".encode()).hexdigest()
            note = cache.read_note(key) if cache else None
            try:
                found = dataclasses.replace(msgspec.msgpack.decode(note, type=Instrumented), wasm=compiled.wasm)
            except (TypeError, msgspec.DecodeError):  # no note (None), or one of another shape
                found = instrument(compiled.wasm)
                if cache:
                    cache.write_note(key, msgspec.msgpack.encode(dataclasses.replace(found, wasm=b"")))
            with self._lock:
                self._instrumented[compiled.module_id] = found
                while len(self._instrumented) > self._limits.runner_modules:
                    self._instrumented.popitem(last=False)
        return found

    def _state(self, vm: Vm, memories: list, globals_: list) -> SnapshotState:
        overrides = {row["name"]: row["value"] for row in vm.limits.rows() if row["source"] == "vm"}
        return SnapshotState(
            module_id=vm.compiled.module_id,
            # A runtime's bake is made again (or found) wherever that runtime is installed: by reference.
            module=b"" if vm.runtime_name is not None else vm.compiled.source,
            mode=vm.mode,  # type: ignore[arg-type]
            limits=overrides,
            wasi=msgspec.to_builtins(vm.wasi),
            memories=memories,
            globals=globals_,
            pending_host_calls=[
                PendingCall(id=call.request_id, ticket=ticket, method=call.method, params=call.params)
                for ticket, call in sorted(vm.async_calls.items())
            ],
            next_ticket=vm.next_ticket,
            sidecar_version=__version__,
            runtime=vm.runtime_name,
            baseline=vm.compiled.module_id,
        )


def _as_invalid_snapshot(exc: RpcError, limits: Limits) -> RpcError:
    """An error from building a restored VM, as -32006 when the file is at fault: its module does
    not fit this sidecar (stage `module`, the sidecar's own error as `cause`) or needs more than a
    guest budget allows (stage `bounds`, naming the limit). What is not about the file stays as it
    is: a runner bound that is full (`runner_vms`), a cancel, a fault of the sidecar's own."""
    if isinstance(exc, InvalidSnapshotError):
        return exc
    if isinstance(exc, LimitExceededError) and limits.spec(exc.details["limit"]).limit_class == "guest":
        return InvalidSnapshotError(f"the snapshot needs more than this sidecar allows: {exc.message}",
                                    stage="bounds", **exc.details)
    if isinstance(exc, GuestTrapError):  # start functions do not run on restore: instantiation trapped
        return InvalidSnapshotError(f"the embedded module traps when instantiated: {exc.details['message']}",
                                    stage="module", cause=exc.data)
    if isinstance(exc, InvalidModuleError):
        return InvalidSnapshotError(f"the embedded module cannot run here: {exc.message}", stage="module",
                                    cause=exc.data)
    return exc
