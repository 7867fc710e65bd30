"""Guest ABI v1: the `sidecar` import module a guest links against.

Owns `input_len`, `input_read`, `output_write`, `host_call`, `response_read` and
`host_call_async`: what each does with the current call's state, and every check on the
guest's pointers, lengths and budgets. The data calls (input, output, response) are C functions
(`wasmffi.native`) that run without the GIL; the host calls are Python.
A broken ABI contract (a bad pointer, a length past memory) traps that guest and nothing else; a
budget that bites records which limit it was so the call's error can name it. An instance made
for a pre-initialization refuses host calls itself (-3 and the reason), and the host never hears
of them. `define` puts the functions in a linker once; each call reaches the state of the
instance whose store it runs in (the store's data, see `wasmffi.native.store_for`), so one
linker serves every instance of a module. Knows nothing about threads: the isolate makes each
instance's store with `GuestAbi.new_store` and swaps in each call's state.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence

import msgspec
import structlog
import wasmtime

from protocol.decoding import compact_json
from protocol.errors import LimitExceededError, ParseError

from .hostcalls import STATUS_TIMEOUT, HostAnswer, HostCalls, bounded, refusal
from .limits import Limits
from .wasmffi import GuestFault, GuestMemory, MemorySlot, define_native_func, define_store_func
from .wasmffi.native import CALLBACKS, GuestIo, store_for

log = structlog.get_logger()

MODULE = "sidecar"
# name -> (params, results): the signatures a guest must import them with.
SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "input_len": ((), ("i32",)),
    "input_read": (("i32",), ()),
    "output_write": (("i32", "i32"), ()),
    "host_call": (("i32", "i32", "i32", "i32"), ("i32",)),
    "response_read": (("i32",), ()),
    "host_call_async": (("i32", "i32", "i32", "i32"), ("i64",)),
    "response_len": ((), ("i32",)),  # extension: the error JSON's length after a -1 status
}
ON_RESPONSE = "sidecar_on_response"  # the export an async answer is delivered to


class CallState(msgspec.Struct):
    """What one guest call can see and what it left behind; owned by the thread running it.

    (A Struct, not a dataclass: one is built per call, and its constructor runs no Python code.)
    """

    input: bytes = b""
    output_cap: int = 0
    deadline: float = float("inf")
    output: bytes = b""  # what the guest wrote, once the call returned
    response: bytes = b""  # what response_read gives before the call's first host answer
    stop: str | None = None  # "cancelled", "timeout" or "disposed": why the deadline callback stopped it
    fault: tuple[str, str] | None = None  # (trap_code, message) of an ABI violation
    exceeded: LimitExceededError | None = None  # a guest budget that ended the call
    host_call_id: str | None = None
    trapped: bool = False  # the call ended in a trap: a stateless instance is not reused


def define(linker: wasmtime.Linker) -> None:
    """The ABI's functions in `linker`, for instances in stores made by `GuestAbi.new_store` only
    (another store's data would be taken for a GuestIo)."""
    handlers = {"host_call": GuestAbi.host_call, "host_call_async": GuestAbi.host_call_async}
    for name, (params, results) in SIGNATURES.items():
        if name in handlers:
            define_store_func(linker, MODULE, name, params, results, handlers[name])
        else:
            define_native_func(linker, MODULE, name, params, results, CALLBACKS[name])


class GuestAbi:
    """The ABI state of one instance: `state` is swapped in for each call."""

    def __init__(
        self,
        vm_id: str,
        limits: Limits,
        hostcalls: HostCalls,
        wait_serving: Callable[[Callable[[], bool], float], None],
        issue_async: Callable[[str, bytes], int],
        refuse_host_calls: str | None = None,
    ) -> None:
        """`refuse_host_calls`, when given, is why every host call gets -3 without reaching the host."""
        self.vm_id = vm_id
        self.limits = limits
        self.hostcalls = hostcalls
        self.wait_serving = wait_serving  # keeps reading input while the answer is out
        self.issue_async = issue_async  # the VM keeps async calls: they outlive this instance's call
        self.refusal = None if refuse_host_calls is None else refusal(refuse_host_calls)
        self.state = CallState()
        self.memory = MemorySlot()  # the instance fills it in once it exists (`bind_memory`)
        self.io = GuestIo()  # the data calls' view of the call; the store holds it too
        self.io.host = weakref.ref(self)  # whose host_call a call in that store is (weak: no cycle)

    def new_store(self, engine: wasmtime.Engine) -> wasmtime.Store:
        """The store for this instance: every ABI function called in it uses this state."""
        return store_for(engine, self.io)

    def bind_memory(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        """The instance's `memory` export, once it exists: every ABI function uses it from now on."""
        self.memory.bind(store, memory)
        self.io.bind(self.memory.context, self.memory.handle)

    def begin(self, state: CallState) -> None:
        self.state = state
        self.io.begin(state.input, state.output_cap, state.response)

    def end(self, state: CallState) -> None:
        """After a call returned: what it wrote."""
        state.output = self.io.output()

    def absorb_faults(self, state: CallState) -> None:
        """After a call trapped: what the data calls refused, as the call's fault or exceeded budget."""
        if state.fault is None and state.exceeded is None:
            observed = self.io.output_overflow
            if observed:
                state.exceeded = self.limits.exceeded(
                    "vm_output_bytes", observed, capacity=state.output_cap, vm_id=self.vm_id
                )
            else:
                state.fault = self.io.fault

    def on_fault(self, fault: GuestFault) -> None:
        """Remember an ABI fault before it traps, so the call's error carries its trap code."""
        if self.state.fault is None and self.state.exceeded is None:
            self.state.fault = (fault.code, str(fault))

    def _request(self, memory: GuestMemory, args: Sequence[int]) -> tuple[str, bytes] | HostAnswer:
        """The method and compact params JSON a guest asks with, or the refusal it gets instead."""
        method_ptr, method_len, params_ptr, params_len = args
        capacity = self.limits.vm_host_call_bytes
        if params_len > capacity or method_len > capacity:
            observed = max(params_len, method_len)
            self.limits.exhausted("vm_host_call_bytes", observed, capacity=capacity, vm_id=self.vm_id)
            return refusal("host call larger than vm_host_call_bytes", limit="vm_host_call_bytes",
                           capacity=capacity, observed=observed)
        method = memory.read(method_ptr, method_len).decode("utf-8", "replace")
        raw = memory.read(params_ptr, params_len)
        try:
            params = compact_json(raw) if raw.strip() else b"null"
        except ParseError as exc:
            return refusal(f"host_call params are not JSON: {exc.message}")
        if self.refusal is not None:  # a well-formed call that no host may hear (pre-initialization)
            log.info("host_call_refused", vm_id=self.vm_id, method=method)
            return self.refusal
        return method, params

    def host_call(self, memory: GuestMemory, args: Sequence[int]) -> list[int]:
        request = self._request(memory, args)
        if isinstance(request, HostAnswer):
            return self._answer(request)
        method, params = request
        state = self.state
        remaining = state.deadline - time.monotonic()
        if remaining <= 0:
            return self._answer(HostAnswer(STATUS_TIMEOUT))
        answer = self.hostcalls.call_blocking(self.vm_id, method, params, remaining, self._track, self.wait_serving)
        state.host_call_id = None
        return self._answer(bounded(answer, self.limits, self.vm_id))

    def host_call_async(self, memory: GuestMemory, args: Sequence[int]) -> list[int]:
        request = self._request(memory, args)
        if isinstance(request, HostAnswer):
            self.io.response = request.payload
            return [request.status]
        return [self.issue_async(*request)]

    def _track(self, request_id: str) -> None:
        self.state.host_call_id = request_id

    def _answer(self, answer: HostAnswer) -> list[int]:
        self.io.response = answer.payload
        return [len(answer.payload) if answer.status == 0 else answer.status]
