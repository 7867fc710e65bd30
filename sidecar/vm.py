"""A VM: one guest's isolate(s), budgets and WASI view, and the serial queue of work on it.

Owns the order and the lifetime of a VM's work. A VM runs one job at a time on the thread that
submitted it when it is idle (the thread that read the request: no hand-off), and later jobs
queue behind it; the thread that finishes a job takes the next. Cancels and disposal reach a
running guest through its call state (stopped at the next epoch tick) and through its blocking
host call (abandoned, so a late answer is stale). Knows nothing about the wire.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import wasmtime

from protocol.errors import InternalError, RpcError, VmNotFoundError

from .dispatcher import Reply
from .guest_abi import CallState
from .hostcalls import HostCalls
from .isolate import Isolate
from .limits import Limits
from .modules import CompiledModule

log = structlog.get_logger()


@dataclass
class Runtime:
    """What every VM shares: the process's hostcalls, the reading hand-off, the output channel."""

    hostcalls: HostCalls
    yield_reading: Callable[[], None]
    send: Callable[[bytes], None]


@dataclass
class Job:
    """One request's work on a VM. `work(vm, state)` returns the result or raises an RpcError."""

    reply: Reply
    work: Callable[[Vm, CallState], object]
    state: CallState = field(default_factory=CallState)

    def cancel(self, hostcalls: HostCalls) -> None:
        """From any thread: stop the guest at its next tick and wake it from a host call."""
        self.state.stop = self.state.stop or "cancelled"
        if self.state.host_call_id is not None:
            hostcalls.abandon(self.state.host_call_id, "the call was cancelled")


class Vm:
    def __init__(
        self,
        vm_id: str,
        compiled: CompiledModule,
        engine: wasmtime.Engine,
        limits: Limits,
        mode: str,
        wasi: object,
        runtime: Runtime,
    ) -> None:
        self.vm_id = vm_id
        self.compiled = compiled
        self.engine = engine
        self.limits = limits
        self.mode = mode
        self.wasi = wasi
        self.runtime = runtime
        self.calls = 0
        self._lock = threading.Lock()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self.disposed = False
        # A command (`_start`) is run fresh by `vm.run`; anything else keeps one live instance.
        self.isolate: Isolate | None = None if compiled.command else self.new_isolate()

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def memory_bytes(self) -> int:
        return self.isolate.memory_bytes if self.isolate is not None else 0

    def new_isolate(self, wasi: wasmtime.WasiConfig | None = None) -> Isolate:
        return Isolate(
            self.vm_id,
            self.compiled,
            self.engine,
            self.limits,
            self.runtime.hostcalls,
            self.runtime.yield_reading,
            wasi,
        )

    def submit(self, job: Job) -> None:
        """Run `job` now on this thread if the VM is idle, else queue it behind the running one."""
        job.reply.on_cancel = lambda: job.cancel(self.runtime.hostcalls)
        with self._lock:
            if self.disposed:
                job.reply.error(VmNotFoundError(self.vm_id))
                return
            if self._running is not None:
                self._queue.append(job)
                return
            self._running = job
        self._drain(job)

    def dispose(self) -> None:
        """End the VM: queued work is refused, a running guest stops at its next tick."""
        with self._lock:
            self.disposed = True
            queued = list(self._queue)
            self._queue.clear()
            running = self._running
        for job in queued:
            job.reply.error(VmNotFoundError(self.vm_id))
        if running is not None:
            running.state.stop = "disposed"
        self.runtime.hostcalls.abandon_owner(self.vm_id, "VM disposed")
        if running is None:
            self._close()

    def _drain(self, job: Job | None) -> None:
        while job is not None:
            self._execute(job)
            with self._lock:
                job = self._queue.popleft() if self._queue and not self.disposed else None
                self._running = job
                closing = job is None and self.disposed
        if closing:
            self._close()

    def _execute(self, job: Job) -> None:
        if job.reply.done:  # cancelled while it waited in the queue
            return
        started = time.perf_counter()
        try:
            result = job.work(self, job.state)
        except RpcError as exc:
            job.reply.error(exc)
        except Exception as exc:  # a sidecar bug costs this request, never the VM or the process
            log.error("vm_job_failed", vm_id=self.vm_id, method=job.reply.method, exc_info=exc)
            job.reply.error(InternalError(f"internal error in {job.reply.method}"))
        else:
            job.reply.result(result)
        finally:
            self.calls += 1
            log.debug("vm_job_done", vm_id=self.vm_id, method=job.reply.method,
                      elapsed_ms=round((time.perf_counter() - started) * 1000, 3))

    def _close(self) -> None:
        if self.isolate is not None:
            self.isolate.close()
            self.isolate = None
