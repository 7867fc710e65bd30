"""Hibernation: idle VMs leave memory and come back on demand, and outlive the process.

Owns which VMs stay resident, `vm.hibernate`, the counters `sidecar.stats` shows, and the VMs an
earlier process left in the state directory (`sidecar.state_dir`). Theory of operation:

- A VM hibernates *in place*: it stays in the registry under its id, with its settings, WASI view
  and pending async host calls (still waiting in the correlator with the VM's own callbacks); only
  its instance goes. A stateful VM's state is captured by a job on the VM, so it never sees a guest
  mid-call, written to the state directory (its module apart, once per module), and the job
  `retires` the instance: the VM closes its store. `Vm.revive` is then set, and the next job that
  needs an instance (any request naming the VM, or the delivery of a host's answer) makes it from
  the file on its own thread. Jobs on a stateful VM run one at a time, so concurrent requests to a
  sleeping VM wake it once: the first makes the instance, the others queue behind it as usual.
  A stateless VM hibernates by closing its warm instances: it has nothing to save.
- What hibernates: past `runner_resident_vms` resident VMs, the least recently used idle ones
  (idle: no work under way); a VM whose `vm_hibernate_idle_ms` passed since a request or host
  answer last reached it; one named by `vm.hibernate`. A VM busy at the time stays resident.
  A new VM past the cap makes room at once (on its request's thread, after the answer has gone);
  a woken one leaves that to the watcher thread, which also keeps the idle timers, so a wake
  costs no more than its restore.
- Past `runner_state_bytes` a VM is not written: it stays resident and `limit_exhausted` names the
  limit (`vm.hibernate` answers -32002). A VM its module does not let us snapshot stays resident.
- With a named state directory, an orderly exit first hibernates every idle stateful VM within
  `runner_hibernate_exit_ms`, and the next process on the directory finds them: each is
  registered asleep under its old id, with its pending host calls, and new ids start past them. A
  file that fails validation, at start or on wake, is quarantined; a wake that finds its file bad
  disposes the VM and answers -32006. A VM a host disposes leaves the disk with it.

Stateless VMs and WASI commands are not carried across processes (nothing of them is written),
nor are a restarted VM's preopened directories (a file never grants access to host directories,
as with `vm.restore`). Lock order: this service's lock, then the registry's; neither is held
while a VM's job runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import structlog

from protocol.errors import InternalError, InvalidParamsError, InvalidSnapshotError, RpcError
from protocol.methods import Empty, VmDisposeParams, VmHibernateParams

from . import snapshots
from .completion import Completion
from .guest_abi import CallState
from .isolate import Isolate
from .job import Job
from .limits import Limits
from .residency import resident
from .runtime import Runtime
from .snapshot_file import SnapshotState
from .snapshot_service import SnapshotService
from .state_dir import Found, StateDir, StateFull
from .vm import Vm
from .vms import VmService
from .wasmbin import Instrumented

log = structlog.get_logger()
_LONGEST_NAP_S = 1.0  # the watcher looks again at least this often (a timer set since it slept)


class Outcome:
    """The completion of work this service waits for itself (a hibernation it decided on, a VM
    registered at start): the result or error, once."""

    id = None
    on_cancel: Callable[[], None] | None = None

    def __init__(self, method: str) -> None:
        self.method = method
        self.done = False
        self._ended = threading.Event()
        self._value: Any = None
        self._error: RpcError | None = None

    def result(self, value: Any) -> None:
        self._end(value, None)

    def error(self, error: RpcError) -> None:
        self._end(None, error)

    def result_of(self, commit: Callable[[], Any]) -> bool:
        self._end(commit(), None)
        return True

    def wait(self) -> Any:
        self._ended.wait()
        if self._error is not None:
            raise self._error
        return self._value

    def _end(self, value: Any, error: RpcError | None) -> None:
        if not self.done:
            self.done = True
            self._value, self._error = value, error
            self._ended.set()


class Hibernation:
    def __init__(self, vms: VmService, snapshot_service: SnapshotService, runtime: Runtime, limits: Limits,
                 state_dir: StateDir, claimed: Callable[[str], bool] | None = None) -> None:
        """`claimed`: whether a VM found in the state directory still belongs to someone (the MCP
        front's sessions); one that does not is removed instead of registered. None: all do."""
        self._vms = vms
        self._snapshots = snapshot_service
        self._runtime = runtime
        self._limits = limits
        self._dir = state_dir
        self._lock = threading.Lock()
        self._resident: dict[str, Vm] = {}  # candidates to hibernate: resident stateful VMs, all stateless ones
        self._chosen: set[str] = set()  # being hibernated by some thread: not chosen again meanwhile
        # Refused by runner_state_bytes, with the VM's last use then: not tried again until used again.
        self._refused: dict[str, float] = {}
        self.hibernations = 0
        self.wakes = 0
        self._stopping = False
        self._look_again = threading.Event()
        vms.residency = self
        self._register([item for item in state_dir.scan() if claimed is None or self._claimed(item, claimed)])
        self._watcher = threading.Thread(target=self._watch, name="hibernation", daemon=True)
        self._watcher.start()

    def routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        return [("vm.hibernate", "deferred", self.vm_hibernate)]

    def stats(self) -> dict[str, Any]:
        return {"hibernations": self.hibernations, "wakes": self.wakes, "state_bytes": self._dir.bytes,
                "state_quarantined": self._dir.quarantined}

    async def close(self) -> None:
        """Stop the watcher; with a named state directory, hibernate the idle VMs first (the
        registry, closing after this, disposes the rest); then let go of the directory."""
        self._stopping = True
        self._look_again.set()
        await anyio.to_thread.run_sync(self._watcher.join)
        if not self._dir.private:
            await anyio.to_thread.run_sync(self._hibernate_for_exit)
        self._dir.close()

    # -- the registry's hooks (`sidecar.residency`) ----------------------------------------

    def joined(self, vm: Vm) -> None:
        """Under the registry's commit, before the host hears of the VM: from here an exit keeps it."""
        if resident(vm):  # not one registered asleep at start
            with self._lock:
                self._resident[vm.vm_id] = vm

    def went_live(self, vm: Vm) -> None:
        with self._lock:
            if self._resident.get(vm.vm_id) is not vm:
                return  # registered asleep, or disposed or hibernated since it joined
            over = self._over_cap()
        if vm.limits.vm_hibernate_idle_ms:
            self._look_again.set()  # its timer may be due before the watcher's next look
        if over > 0:
            self._runtime.reader.yield_reading()  # writing state takes a while: another thread reads
            for victim in self._least_recently_used(over, sparing=vm):
                self._try_hibernate(victim)

    def disposed(self, vm: Vm) -> None:
        with self._lock:
            self._resident.pop(vm.vm_id, None)
            self._refused.pop(vm.vm_id, None)
        self._dir.delete(vm.vm_id)

    # -- vm.hibernate ------------------------------------------------------------------------

    def vm_hibernate(self, params: VmHibernateParams, reply: Completion) -> None:
        vm = self._vms.find(params.vm_id)
        if not resident(vm):
            reply.result(Empty())
        elif vm.mode == "stateless" or vm.compiled.command:
            if not vm.drop_warm():
                raise InvalidParamsError("the VM has work under way; hibernate it when it is idle", path="$.vm_id",
                                         state="busy")
            self._count_stateless(vm)
            reply.result(Empty())
        else:
            self._runtime.reader.yield_reading()  # capturing and writing state takes a while
            self._put_to_sleep(vm, reply)

    # -- hibernating and waking ------------------------------------------------------------

    def _put_to_sleep(self, vm: Vm, reply: Completion) -> None:
        """A job on the stateful `vm` that writes its state and retires its instance; it ends
        `reply` with `{}` or the reason the VM stays resident."""
        instrumented = self._snapshots.snapshottable(vm)

        def work(vm: Vm, isolate: Isolate | None, _: CallState) -> Empty:
            if isolate is None:
                return Empty()  # hibernated meanwhile (by another thread's job)
            state = self._snapshots.state_of(vm, isolate, instrumented, embed_module=False)
            wall = time.time() - (time.monotonic() - vm.last_used)
            try:
                added = self._dir.save(vm.vm_id, state, None if vm.runtime_name else vm.compiled.source, wall)
            except StateFull as exc:
                raise vm.limits.exceeded("runner_state_bytes", exc.observed, vm_id=vm.vm_id) from None
            except OSError as exc:
                raise InternalError(f"cannot write the state directory: {exc.strerror or exc}",
                                    vm_id=vm.vm_id) from None
            vm.revive = self._revive
            job.retires = True
            if vm.disposed:  # disposed while it was written: its dispose may have looked before the file existed
                self._dir.delete(vm.vm_id)
            with self._lock:
                self._resident.pop(vm.vm_id, None)
                self.hibernations += 1
            log.info("vm_hibernated", vm_id=vm.vm_id, state_bytes=added)
            return Empty()

        job = Job(reply, work, hibernates=True)
        vm.submit(job)

    def _revive(self, vm: Vm) -> Isolate:
        """`Vm.revive` of a hibernated VM: its instance from its state file, on the thread of the
        job that needs it. A file that fails validation is quarantined and the VM disposed."""
        if vm.runtime_name is not None:
            self._runtime.reader.yield_reading()  # an interpreter's state takes tens of milliseconds
        try:
            state = self._dir.load(vm.vm_id)
            if state.module_id != vm.compiled.module_id:
                raise InvalidSnapshotError("the state is of another module than its VM's", stage="module",
                                           expected=vm.compiled.module_id, found=state.module_id)
            isolate = self._restored(vm, self._snapshots.instrumented(vm.compiled), state)
        except InvalidSnapshotError as exc:
            self._dir.quarantine(vm.vm_id, exc)
            self._vms.vm_dispose(VmDisposeParams(vm_id=vm.vm_id))
            raise InvalidSnapshotError(f"the hibernated state of {vm.vm_id} failed validation and was quarantined; "
                                       f"the VM is gone: {exc.message}", vm_id=vm.vm_id, **exc.details) from None
        vm.revive = None
        self._dir.delete(vm.vm_id)
        with self._lock:
            self._resident[vm.vm_id] = vm
            self.wakes += 1
            over = self._over_cap()
        if over > 0 or vm.limits.vm_hibernate_idle_ms:
            self._look_again.set()  # the watcher makes room, off this request's path, and times it
        log.debug("vm_woken", vm_id=vm.vm_id)
        return isolate

    @staticmethod
    def _restored(vm: Vm, instrumented: Instrumented, state: SnapshotState) -> Isolate:
        isolate = vm.isolate_for(start=False)
        try:
            snapshots.apply(isolate, instrumented, state.memories, state.globals, vm.limits,
                            diffed=state.baseline is not None)
            isolate.refresh_memory()
        except BaseException:
            isolate.close()
            raise
        return isolate

    def _try_hibernate(self, vm: Vm) -> bool:
        """Hibernate `vm` if it can be now; why not is logged (a limit, by `limits.exceeded`)."""
        if vm.mode == "stateless" or vm.compiled.command:
            done = vm.drop_warm()
            if done:
                self._count_stateless(vm)
            return done
        with self._lock:
            if vm.vm_id in self._chosen:
                return False  # another thread is at it
            self._chosen.add(vm.vm_id)
        outcome = Outcome("vm.hibernate")
        try:
            self._put_to_sleep(vm, outcome)
            outcome.wait()
        except InvalidParamsError as exc:
            if exc.details.get("state") != "busy":  # it can never be snapshotted: stop trying
                with self._lock:
                    self._resident.pop(vm.vm_id, None)
                log.info("vm_stays_resident", vm_id=vm.vm_id, reason=exc.message)
            return False
        except RpcError as exc:
            if exc.details.get("limit") == "runner_state_bytes":
                with self._lock:
                    self._refused[vm.vm_id] = vm.last_used
            log.debug("vm_hibernation_failed", vm_id=vm.vm_id, kind=exc.kind, error=exc.message)
            return False
        finally:
            with self._lock:
                self._chosen.discard(vm.vm_id)
        return True

    def _count_stateless(self, vm: Vm) -> None:
        with self._lock:
            self.hibernations += 1
        log.info("vm_hibernated", vm_id=vm.vm_id, state_bytes=0)

    # -- choosing ------------------------------------------------------------------------

    def _over_cap(self) -> int:
        """Resident VMs past `runner_resident_vms` (under the lock)."""
        cap = self._limits.runner_resident_vms
        return sum(1 for vm in self._resident.values() if resident(vm)) - cap if cap else 0

    def _least_recently_used(self, count: int, sparing: Vm | None = None) -> list[Vm]:
        with self._lock:
            idle = [vm for vm in self._resident.values() if vm is not sparing and self._may_try(vm)]
        return sorted(idle, key=lambda vm: vm.last_used)[:count]

    def _may_try(self, vm: Vm) -> bool:
        """Whether to hibernate `vm` now, if chosen (under the lock)."""
        return (vm.vm_id not in self._chosen and self._refused.get(vm.vm_id) != vm.last_used and resident(vm)
                and not vm.busy and not vm.disposed)

    def _watch(self) -> None:
        """The watcher thread: makes room past the cap and hibernates VMs whose idle time passed."""
        nap = _LONGEST_NAP_S
        while True:
            self._look_again.wait(nap)
            self._look_again.clear()
            if self._stopping:
                return
            try:
                nap = self._sweep()
                self._dir.empty_trash()
            except Exception as exc:  # a bug here must not end hibernation for the process
                log.error("hibernation_sweep_failed", exc_info=exc)
                nap = _LONGEST_NAP_S

    def _sweep(self) -> float:
        """Hibernate what is due; seconds until the next VM is due."""
        with self._lock:
            over = self._over_cap()
        due = self._least_recently_used(over) if over > 0 else []
        nap, now = _LONGEST_NAP_S, time.monotonic()
        with self._lock:
            timed = [(vm, self._may_try(vm)) for vm in self._resident.values()
                     if vm.limits.vm_hibernate_idle_ms and resident(vm)]
        for vm, may in timed:
            idle_s = vm.limits.vm_hibernate_idle_ms / 1000
            left = vm.last_used + idle_s - now
            if left <= 0 and may:
                due.append(vm)
            elif left > 0 or vm.busy:  # a busy VM is looked at again a quarter of its idle time later
                nap = min(nap, left if left > 0 else idle_s / 4)
        for vm in dict.fromkeys(due):
            if self._stopping:
                break
            self._try_hibernate(vm)
        return nap

    # -- start and exit ------------------------------------------------------------------

    def _register(self, found: list[Found]) -> None:
        """The VMs an earlier process left: registered asleep under their ids, new ids past them."""
        self._vms.claim_ids([item.vm_id for item in found])
        for item in found:
            try:
                with self._vms.starting() as slot:
                    vm = self._snapshots.resume(item.state, slot, Outcome("vm.restore"), vm_id=item.vm_id,
                                                revive=self._revive)
            except RpcError as exc:
                if exc.details.get("limit") == "runner_vms":
                    log.warning("state_vm_not_registered", vm_id=item.vm_id, reason=exc.message)
                else:
                    self._dir.quarantine(item.vm_id, exc)
                continue
            if vm is not None:
                vm.last_used = time.monotonic() - max(0.0, time.time() - item.last_used)
        if found:
            log.info("state_found", vms=len(found), state_dir=str(self._dir.path))

    def _claimed(self, item: Found, claimed: Callable[[str], bool]) -> bool:
        if claimed(item.vm_id):
            return True
        self._dir.delete(item.vm_id)
        log.info("state_vm_unclaimed", vm_id=item.vm_id)
        return False

    def _hibernate_for_exit(self) -> None:
        """Hibernate every idle stateful VM within `runner_hibernate_exit_ms`."""
        started = time.monotonic()
        deadline = started + self._limits.runner_hibernate_exit_ms / 1000
        with self._lock:
            vms = [vm for vm in self._resident.values() if vm.mode == "stateful" and resident(vm)]
        kept = 0
        for index, vm in enumerate(vms):
            if time.monotonic() >= deadline:
                self._limits.exhausted("runner_hibernate_exit_ms", round((time.monotonic() - started) * 1000),
                                       vms_left=len(vms) - index)
                break
            if not vm.busy and not vm.compiled.command:
                kept += self._try_hibernate(vm)
        log.info("vms_hibernated_at_exit", vms=kept, resident=len(vms) - kept)
