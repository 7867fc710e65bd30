"""A VM: one guest's isolates, budgets and WASI view, and the order of the work done on them.

Owns scheduling and instance lifetime. A job runs on the thread that submitted it when an
instance is free (the thread that read the request: no hand-off); otherwise it queues, and the
thread that finishes a job takes the next one. A stateful VM has one instance whose state
persists, so its jobs run one at a time. A stateless VM keeps up to `vm_pool_instances` warm
instances that serve calls in parallel and recycles each one (closes its store and starts a
fresh one, after the answer has gone out) once it has served `vm_recycle_after_calls` calls,
retains more than `vm_recycle_memory_bytes` of linear memory (which never shrinks), or trapped.
Cancels and disposal reach a running guest through its call state (stopped at the next epoch
tick) and its blocking host call (abandoned, so a late answer is stale). Knows nothing about
the wire.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

import structlog
import wasmtime

from protocol.errors import InternalError, RequestCancelledError, RpcError, VmNotFoundError
from protocol.methods import WasiSettings

from .completion import Delivery
from .engines import EngineLease
from .guest_abi import ON_RESPONSE, CallState
from .hostcalls import STATUS_HOST_ERROR, STATUS_OK, STATUS_REFUSED, AsyncCall, HostAnswer, bounded
from .isolate import Isolate
from .job import Job, stopped_the_guest
from .limits import CallBudget, Limits
from .modules import CompiledModule
from .rewind import Rewinder
from .runtime import Runtime
from .wasi_view import wasi_config

log = structlog.get_logger()
Mode = Literal["stateful", "stateless"]


class Vm:
    def __init__(
        self,
        vm_id: str,
        compiled: CompiledModule,
        lease: EngineLease,
        limits: Limits,
        mode: Mode,
        wasi: WasiSettings,
        runtime: Runtime,
        *,
        start: bool = True,
        asleep: bool = False,
        runtime_name: str | None = None,
        prepare: Callable[[Isolate], None] | None = None,
        spare: Isolate | None = None,
    ) -> None:
        """`start=False`: the first instance skips its start function (a restore fills it in);
        `asleep`: it has none until a job needs it. `revive`, set while the VM is hibernated, makes
        its next instance from the saved state (and unsets itself).
        `lease` holds the module's engine; the VM releases it once disposed and quiet.
        `runtime_name`: the sidecar-provided guest (`python`) it runs, whose instance holds an
        interpreter: one that a fault stopped mid-way is not trusted again, even in a stateful VM.
        `prepare(isolate)` runs on each new instance that starts afresh, before it serves.
        `spare`: an instance made ahead for a VM like this one (`sidecar.spares`), its first."""
        self.vm_id = vm_id
        self.compiled = compiled
        self._lease = lease
        self.limits = limits
        self.budget = CallBudget.of(limits)
        self.mode = mode
        self.wasi = wasi
        self.runtime = runtime
        self.runtime_name = runtime_name
        self._prepare = prepare
        # A runtime's stateless instances are rewound in place after an eval rather than replaced.
        self._rewinder = Rewinder(vm_id, self.isolate_for, lambda: wasi_config(wasi) if compiled.wasi else None,
                                  prepare, limits) if mode == "stateless" and prepare is not None else None
        self.calls = 0
        self.last_used = time.monotonic()  # when the last job was submitted: hibernation goes by it
        self.revive: Callable[[Vm], Isolate] | None = None
        self.recycles: dict[str, int] = {}  # by reason; a dict, as a Counter costs ~0.8 µs more per vm.create
        self.async_calls: dict[int, AsyncCall] = {}  # by ticket
        self.next_ticket = 0
        self.disposed = False
        self._slots = limits.vm_pool_instances if mode == "stateless" else 1
        # Whether a call can use up an instance (`_used_up`): a plain stateful VM's never is, so its
        # calls skip the check (two frames on every call's path).
        self._recycles = mode == "stateless" or runtime_name is not None
        self._lock = threading.Lock()
        # Notified when the last running job ends; made by the first `wait_idle`, since making one
        # costs ~4 µs, on every vm.create's path. Notifying costs ~1.5 µs per job even when nobody waits.
        self._quiet: threading.Condition | None = None
        self._quiet_waiters = 0
        self._queue: deque[Job] = deque()
        self._running: set[Job] = set()  # jobs holding an instance slot, bookkeeping included
        self._working = 0  # jobs whose work has not finished: what `busy` reports
        self._idle: list[Isolate | None] = []
        self._live: list[Isolate] = []
        self._replacing = 0  # instances being built to replace a retired one, each for the next job
        # A command keeps no instance (each vm.run starts afresh); others start one now: a bad start fails vm.create.
        if spare is not None:
            spare.adopt(vm_id, self.issue_async)
            self._live.append(spare)
            self._idle.append(spare)
        else:
            self._idle.append(None if compiled.command or asleep else self._spawn(start=start))
        if mode == "stateless" and prepare is not None and self._slots > 1 and not asleep:
            # A spare, one of the pool's: a request that comes while the last one's replacement is
            # being warmed (an interpreter: ~1.5 ms) takes it instead of waiting.
            self._idle.append(self._spawn())

    @property
    def busy(self) -> bool:
        """Some request's work is under way (its answer not yet decided)."""
        return self._working > 0

    @property
    def in_guest(self) -> bool:
        """Guest code is on some instance's stack (running, or blocked in `host_call`)."""
        return any(isolate.in_guest for isolate in list(self._live))

    @property
    def memory_bytes(self) -> int:
        """Linear memory retained by the live instances (as of their last call)."""
        return sum(isolate.memory_bytes for isolate in list(self._live))

    @property
    def instances(self) -> int:
        return len(self._live)

    def submit(self, job: Job) -> None:
        """Run `job` now on this thread if the VM has room, else queue it."""
        job.reply.on_cancel = lambda: job.cancel(self.runtime.hostcalls)
        if not job.hibernates:  # the one job that is no use of the VM
            self.last_used = time.monotonic()
        with self._lock:
            if self.disposed:
                job.reply.error(VmNotFoundError(self.vm_id))
                return
            if self._idle:
                isolate = self._idle.pop()
            elif len(self._running) < self._slots and self._replacing <= len(self._queue):
                # Room in the pool, and no replacement already on its way for it (that one comes
                # sooner than a new one would): `_drain` starts one more instance.
                isolate = None
            else:
                self._queue.append(job)
                return
            self._running.add(job)
            self._working += 1  # here, not in `_execute`: one lock round trip per call fewer
        self._drain(job, isolate)

    def dispose(self) -> None:
        """End the VM: queued work is refused, running guests stop at their next tick."""
        with self._lock:
            self.disposed = True
            queued = list(self._queue)
            self._queue.clear()
            running = list(self._running)
            idle = [isolate for isolate in self._idle if isolate is not None]
            self._idle.clear()
        for job in queued:
            job.reply.error(VmNotFoundError(self.vm_id))
        for job in running:
            job.state.stop = "disposed"
        self.runtime.hostcalls.abandon_owner(self.vm_id, "VM disposed")
        for isolate in idle:
            self._close(isolate)
        if self._rewinder is not None:
            self._rewinder.close(final=True)
        self._release_engine_if_quiet()

    def drop_warm(self) -> bool:
        """A stateless VM hibernates: its idle instances (nothing to save) close; False if busy or stateful."""
        with self._lock:
            if self.mode != "stateless" or self._running or self.disposed:
                return False
            idle, self._idle = [isolate for isolate in self._idle if isolate is not None], []
        for isolate in idle:
            self._close(isolate)
        if self._rewinder is not None:
            self._rewinder.close()  # made again at the next rewind
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no job runs (after `dispose`, guests stop within a tick); False on timeout."""
        with self._lock:
            if self._quiet is None:
                self._quiet = threading.Condition(self._lock)
            self._quiet_waiters += 1
            try:
                return self._quiet.wait_for(lambda: not self._running, timeout_s)
            finally:
                self._quiet_waiters -= 1

    def _spawn(self, *, start: bool = True) -> Isolate:
        revive = self.revive
        isolate = self.isolate_for(start=start) if revive is None else revive(self)
        with self._lock:
            self._live.append(isolate)
        if start and revive is None and self._prepare is not None:
            self._prepare(isolate)  # before it serves: its first request then costs what later ones do
        return isolate

    def isolate_for(self, wasi: wasmtime.WasiConfig | None = None, *, start: bool = True) -> Isolate:
        """A new instance of this VM's module with its budgets (not yet part of its pool). A WASI
        module sees the VM's WASI view unless the caller brings a config of its own (a run)."""
        if wasi is None and self.compiled.wasi:
            wasi = wasi_config(self.wasi)
        return Isolate(self.vm_id, self.compiled, self.limits, self.runtime, self.issue_async, wasi, start=start)

    def idle_instance(self) -> Isolate:
        """The one instance of a new stateful VM, for a restore to write its state into."""
        isolate = self._idle[0] if self.mode == "stateful" and not self._running and self._idle else None
        if isolate is None:
            raise InternalError("a restore needs a new stateful VM with one idle instance")
        return isolate

    # -- async host calls ----------------------------------------------------------------

    def issue_async(self, method: str, params: bytes) -> int:
        """`host_call_async`: a ticket >= 0, or -3 when refused. Only stateful VMs keep the state
        an answer must come back to."""
        capacity = self.limits.vm_host_calls_in_flight
        with self._lock:
            refused = self.mode != "stateful" or self.disposed or len(self.async_calls) >= capacity
            ticket = self.next_ticket
            if not refused:
                self.next_ticket += 1
        if refused:
            if len(self.async_calls) >= capacity:
                self.limits.exhausted("vm_host_calls_in_flight", len(self.async_calls) + 1, vm_id=self.vm_id)
            return STATUS_REFUSED
        request_id = self.runtime.hostcalls.issue(self.vm_id, method, params, self._answer_to(ticket))
        # Outside the lock, and after a check made under it: safe only because a stateful VM (the
        # only kind that gets here) runs one job at a time, and only its guest's thread issues.
        self.async_calls[ticket] = AsyncCall(request_id, method, params)
        return ticket

    def adopt_async(self, ticket: int, call: AsyncCall) -> bool:
        """A pending call restored from a snapshot: live again under its original id (False if
        a VM of this process still waits on that id)."""
        if not self.runtime.hostcalls.adopt(call.request_id, self.vm_id, call.method, self._answer_to(ticket)):
            return False
        self.async_calls[ticket] = call
        return True

    def _answer_to(self, ticket: int) -> Callable[[HostAnswer], None]:
        def deliver(answer: HostAnswer) -> None:
            self.submit(Job(Delivery(self.vm_id, ON_RESPONSE), lambda vm, isolate, state: vm._on_response(
                isolate, state, ticket, answer)))

        return deliver

    def _on_response(self, isolate: Isolate | None, state: CallState, ticket: int, answer: HostAnswer) -> None:
        """Call the guest's `sidecar_on_response(ticket, status, len)`; `response_read` reads it."""
        self.async_calls.pop(ticket, None)
        if isolate is None:
            return
        answer = bounded(answer, self.limits, self.vm_id)
        status = answer.status if answer.status in (STATUS_OK, STATUS_HOST_ERROR) else STATUS_REFUSED
        state.response = answer.payload
        state.deadline = time.monotonic() + self.limits.vm_call_timeout_ms / 1000
        isolate.call(ON_RESPONSE, [ticket, status, len(answer.payload)], state, self.limits.vm_call_timeout_ms)

    def _drain(self, job: Job | None, isolate: Isolate | None) -> None:
        while job is not None:
            try:
                if isolate is None and not self.compiled.command and not (job.hibernates and self.revive):
                    isolate = self._spawn()
            except RpcError as exc:  # e.g. a start function that traps: this job fails, the VM lives
                self._settled()
                job.reply.error(exc)
            else:
                self._execute(job, isolate)
                if self._recycles or job.retires:
                    isolate = self._recycle_if_due(isolate, job)
            # The hook `submit` set refers to the job, which refers to the reply: a cycle that only the
            # cyclic GC would free, with all the call's objects. One per call made it run every ~40
            # calls and cost a `vm.call` ~5 µs of CPU in the real process (`bench_path_parts`).
            job.reply.on_cancel = None
            with self._lock:
                self._running.discard(job)
                job = self._queue.popleft() if self._queue and not self.disposed else None
                if job is not None:
                    self._running.add(job)
                    self._working += 1
                else:
                    if self._quiet_waiters and self._quiet is not None:
                        self._quiet.notify_all()
                    if not self.disposed:
                        self._idle.append(isolate)
                        return
        if isolate is not None:  # disposed while this thread worked: nobody else will close it
            self._close(isolate)
        self._release_engine_if_quiet()

    def _settled(self) -> None:
        """A job ended without running (`submit` or `_drain` counted it as working when it took its slot)."""
        with self._lock:  # stateless pools run jobs on several threads at once
            self._working -= 1

    def _execute(self, job: Job, isolate: Isolate | None) -> None:
        if job.reply.done:  # cancelled while it waited in the queue
            self._settled()
            return
        try:
            result = job.work(self, isolate, job.state)
        except RpcError as exc:
            outcome: tuple[object, RpcError | None] = (None, exc)
            job.state.trapped = stopped_the_guest(exc)
        except Exception as exc:  # a sidecar bug costs this request, never the VM or the process
            log.error("vm_job_failed", vm_id=self.vm_id, method=job.reply.method, exc_info=exc)
            outcome = (None, InternalError(f"internal error in {job.reply.method}"))
        else:
            outcome = (result, None)
            if job.state.stop is not None:
                # A cancel or dispose that reached the guest in a host call may let it return
                # normally before the next tick: its result is not an answer for a call that ended.
                outcome = (None, RequestCancelledError(f"the call was stopped: VM {job.state.stop}",
                                                       vm_id=self.vm_id, reason=job.state.stop))
                job.state.trapped = True
        with self._lock:  # before the answer: a host that has it sees the call counted, the VM idle
            self._working -= 1  # `_settled`'s, inline: a frame fewer on every call's path
            self.calls += 1
        value, error = outcome
        if error is None:
            job.reply.result(value)
        else:
            job.reply.error(error)

    def _recycle_if_due(self, isolate: Isolate | None, job: Job) -> Isolate | None:
        """Retire a used-up instance once the answer has gone out, and start its replacement now,
        off the next call's path (None if that failed: the next job retries). Stateless instances
        are used up by calls, memory or a trap; a runtime's stateful one only by a fault."""
        if isolate is None or self.disposed:
            return isolate
        if job.retires:
            self._close(isolate)
            return None
        reason = self._used_up(isolate, job)
        if reason is None:
            return isolate
        self.recycles[reason] = self.recycles.get(reason, 0) + 1
        log.debug("instance_recycled", vm_id=self.vm_id, reason=reason, calls=isolate.calls,
                  memory_bytes=isolate.memory_bytes)
        # The answer has left; building the replacement takes a while (a big module's instance): the
        # next request should not wait behind it, so another thread reads meanwhile.
        self.runtime.reader.yield_reading()
        with self._lock:
            self._replacing += 1
        try:
            if reason == "calls" and self._rewinder is not None and self._rewinder.renew(isolate):
                self.recycles["rewound"] = self.recycles.get("rewound", 0) + 1
                return isolate
            self._close(isolate)
            return self._spawn()
        except RpcError as exc:
            log.warning("instance_start_failed", vm_id=self.vm_id, error=exc.message)
            return None
        finally:
            with self._lock:
                self._replacing -= 1

    def _used_up(self, isolate: Isolate, job: Job) -> str | None:
        if self.mode != "stateless":
            return "trap" if job.state.trapped and self.runtime_name is not None else None
        isolate.calls += 1
        limits = self.limits
        if job.state.trapped:
            return "trap"
        if limits.vm_recycle_after_calls and isolate.calls >= limits.vm_recycle_after_calls:
            return "calls"
        if limits.vm_recycle_memory_bytes and isolate.memory_bytes > limits.vm_recycle_memory_bytes:
            return "memory"
        return None

    def _release_engine_if_quiet(self) -> None:
        """Disposed, no job running, no store open: nothing needs its engine ticked; releasing twice is harmless."""
        with self._lock:
            quiet = self.disposed and not self._running and not self._live
        if quiet:
            self._lease.release()

    def _close(self, isolate: Isolate) -> None:
        with self._lock:
            if isolate in self._live:
                self._live.remove(isolate)
        isolate.close()

