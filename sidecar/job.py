"""A job: one request's work on a VM, and what its failure says about the instance it ran on.

Kept apart from `vm` (which schedules jobs) so the modules that make jobs need not know how a
VM runs them.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from protocol.errors import CallTimeoutError, GuestTrapError, LimitExceededError, RequestCancelledError, RpcError

from .completion import Completion
from .guest_abi import CallState
from .hostcalls import HostCalls

_GUEST_STOPPED = (GuestTrapError, CallTimeoutError, RequestCancelledError, LimitExceededError)


class Job(msgspec.Struct, eq=False):  # identity: jobs are tracked in sets while they run
    """One request's work. `work(vm, isolate, state)` returns the result or raises an RpcError;
    `isolate` is None for a VM that holds a WASI command (each run makes its own). Its type names
    neither `Vm` nor `Isolate`: `vm` imports this module, and the layers allow no cycle, not even
    one for types."""

    reply: Completion
    work: Callable[..., object]
    state: CallState = msgspec.field(default_factory=CallState)
    retires: bool = False  # its instance is closed after it, not kept (the VM hibernated)
    hibernates: bool = False  # a hibernation: on a VM asleep already it runs without an instance

    def cancel(self, hostcalls: HostCalls) -> None:
        """From any thread: stop the guest at its next tick and wake it from a host call."""
        self.state.stop = self.state.stop or "cancelled"
        if self.state.host_call_id is not None:
            hostcalls.abandon(self.state.host_call_id, "the call was cancelled")


def stopped_the_guest(error: RpcError) -> bool:
    """The guest stopped mid-way (trap, timeout, cancel, its own budget), so its instance's state
    is suspect; a runner budget that refused the sidecar's own work (a snapshot too big) is not."""
    runner_refusal = str(error.details.get("limit", "")).startswith("runner_")
    return isinstance(error, _GUEST_STOPPED) and not runner_refusal
