"""Outbound `host.call` requests: issue from any thread, deliver answers, drop what matches nothing.

Owns the thread-safe shell around `protocol.correlator`: guests' worker threads issue calls and
wait on them, the intake's leader thread delivers the host's responses (a leader whose guest
waits in `host_call` delivers its own answer: `sidecar.intake`, rule 5), and disposal or
cancellation abandons a VM's calls. Every correlator operation and counter is under one lock.
Every answer that matches no live call is dropped with a log event and a counter by reason.
Knows nothing about guests' memory; `HostAnswer` is what a guest gets back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from protocol.correlator import Correlator, Delivered, DropReason, Pending
from protocol.decoding import IncomingResponse
from protocol.envelope import Request, encode
from protocol.errors import env_var_for
from protocol.methods import HostCallParams

from .limits import Limits
from .logs import log

# Guest ABI v1 statuses.
STATUS_OK = 0
STATUS_HOST_ERROR = -1
STATUS_TIMEOUT = -2
STATUS_REFUSED = -3


@dataclass(frozen=True)
class AsyncCall:
    """A `host_call_async` the VM waits on; it outlives calls, instances and even processes."""

    request_id: str
    method: str
    params: bytes


class HostAnswer(msgspec.Struct, frozen=True):
    """What the guest reads: a status and compact JSON (the result, or an error object)."""

    status: int
    payload: bytes = b""


def refusal(reason: str, **details: object) -> HostAnswer:
    """A call the sidecar refused or abandoned; its JSON says why, and names any limit."""
    if "limit" in details:
        details["env"] = env_var_for(str(details["limit"]))
    body = {"code": STATUS_REFUSED, "message": reason, **details}
    return HostAnswer(STATUS_REFUSED, msgspec.json.encode(body))


class BlockingCall:
    """A call whose guest thread waits for the answer (`host_call`).

    A bare lock, held until the answer comes, is the gate: a `threading.Event` costs ~2 µs to
    build, a noticeable share of a host call. The correlator delivers each call at most once.
    """

    __slots__ = ("id", "_answer", "_gate")

    def __init__(self) -> None:
        self.id = ""
        self._answer: HostAnswer | None = None
        self._gate = threading.Lock()
        self._gate.acquire()

    def __call__(self, answer: HostAnswer) -> None:
        if self._answer is None:
            self._answer = answer
            self._gate.release()

    def answered(self) -> bool:
        return self._answer is not None

    def wait(self, timeout_s: float) -> HostAnswer | None:
        """The answer, or None when the time ran out first."""
        if self._answer is None and not self._gate.acquire(timeout=max(0.0, timeout_s)):
            return None
        return self._answer


class HostCalls:
    def __init__(self, limits: Limits, send: Callable[[bytes], None]) -> None:
        self._limits = limits
        self._send = send
        self._lock = threading.Lock()
        self._correlator = Correlator(limits.protocol_completed_ids)
        self.dropped: dict[DropReason, int] = {"unmatched": 0, "duplicate": 0, "stale": 0}

    @property
    def pending(self) -> int:
        return len(self._correlator)

    def pending_for(self, owner: str) -> int:
        with self._lock:
            return len(self._correlator.pending_of(owner))

    def issue(self, owner: str, method: str, params_json: bytes, waiter: Callable[[HostAnswer], None]) -> str:
        """Send `host.call` for `owner` (a vm_id); `waiter` gets exactly one answer unless abandoned."""
        with self._lock:
            pending = self._correlator.issue(owner, method, None, waiter)
        params = HostCallParams(vm_id=owner, method=method, params=msgspec.Raw(params_json))
        self._send(encode(Request(id=pending.id, method="host.call", params=params)))
        return pending.id

    def call_blocking(
        self,
        owner: str,
        method: str,
        params_json: bytes,
        timeout_s: float | None = None,
        on_issued: Callable[[str], None] | None = None,
        wait_serving: Callable[[Callable[[], bool], float], None] | None = None,
    ) -> HostAnswer:
        """Issue and wait; on timeout the call is abandoned, so a late answer is dropped as stale.

        The wait is `protocol_host_call_timeout_ms`, or less when the caller's own deadline
        (what is left of the guest's call budget) comes first. `on_issued(id)` runs before the
        wait (a caller records the id for a cancel); `wait_serving(answered, timeout)` is how a
        thread that reads input keeps reading until its answer comes.
        """
        limit_s = self._limits.protocol_host_call_timeout_ms / 1000
        timeout_s = limit_s if timeout_s is None else min(timeout_s, limit_s)
        deadline = time.monotonic() + timeout_s  # one deadline for both ways of waiting below
        waiter = BlockingCall()
        waiter.id = self.issue(owner, method, params_json, waiter)
        if on_issued is not None:
            on_issued(waiter.id)
        if wait_serving is not None:
            wait_serving(waiter.answered, deadline - time.monotonic())
        answer = waiter.wait(deadline - time.monotonic())
        if answer is not None:
            return answer
        if self.abandon(waiter.id):
            log.warning("host_call_timed_out", vm_id=owner, method=method, request_id=waiter.id, timeout_s=timeout_s)
            return HostAnswer(STATUS_TIMEOUT)
        return waiter.wait(0) or HostAnswer(STATUS_TIMEOUT)  # answered in the same instant

    def adopt(self, request_id: str, owner: str, method: str, waiter: Callable[[HostAnswer], None]) -> bool:
        """Wait again on a call issued by an earlier process (restored from a snapshot), same id;
        False if a live VM here still waits on that id."""
        with self._lock:
            return self._correlator.adopt(Pending(request_id, owner, method, None, waiter))

    def is_pending(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._correlator

    def abandon(self, request_id: str, reason: str | None = None) -> bool:
        """Give up on one call; with a `reason`, its waiter hears a refusal now (a cancel)."""
        with self._lock:
            pending = self._correlator.abandon(request_id)
        if pending is not None and reason is not None:
            pending.waiter(refusal(reason, request_id=request_id))
        return pending is not None

    def abandon_owner(self, owner: str, reason: str) -> int:
        """End every call of one VM; their waiters hear a refusal and late answers become stale."""
        with self._lock:
            gone = self._correlator.abandon_owner(owner)
        for pending in gone:
            pending.waiter(refusal(reason, request_id=pending.id))
        return len(gone)

    def deliver(self, response: IncomingResponse, *, unless_guest: bool = False) -> bool:
        """Deliver `response` to its caller, or drop it (logged and counted by reason).

        With `unless_guest`, an async call's answer, whose delivery runs the VM's
        `sidecar_on_response`, stays pending instead and the result is False: a thread that must
        not be held up hands it on. A blocking call's answer only wakes its waiter.
        """
        key = response.id if isinstance(response.id, str) else None
        with self._lock:
            if unless_guest and key is not None:
                pending = self._correlator.get(key)
                if pending is not None and not isinstance(pending.waiter, BlockingCall):
                    return False
            verdict = self._correlator.resolve(response.id)
            delivered = isinstance(verdict, Delivered)
            if not delivered:  # counted under the lock: answers arrive on any thread
                self.dropped[verdict.reason] += 1
        if not delivered:
            log.info("response_dropped", reason=verdict.reason, request_id=response.id, vm_id=verdict.owner)
            return True
        verdict.pending.waiter(_answer_from(response))
        return True


def _answer_from(response: IncomingResponse) -> HostAnswer:
    if response.error is not None:
        return HostAnswer(STATUS_HOST_ERROR, msgspec.json.encode(response.error))
    return HostAnswer(STATUS_OK, msgspec.json.format(bytes(response.result), indent=-1))


def bounded(answer: HostAnswer, limits: Limits, vm_id: str) -> HostAnswer:
    """The answer a guest may read: past its `vm_host_call_bytes`, a refusal naming that limit."""
    capacity = limits.vm_host_call_bytes
    if len(answer.payload) <= capacity or answer.status not in (STATUS_OK, STATUS_HOST_ERROR):
        return answer
    limits.exhausted("vm_host_call_bytes", len(answer.payload), capacity=capacity, vm_id=vm_id)
    return refusal("host answer larger than vm_host_call_bytes", limit="vm_host_call_bytes",
                   capacity=capacity, observed=len(answer.payload))
