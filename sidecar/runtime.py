"""What every VM and instance shares with the daemon around it, as one small bundle.

Owns nothing but two interfaces: `InputReader`, what guest work owes whoever reads the host's
input (the intake implements it; its rules are `sidecar.intake`'s), and `Runtime`, the few daemon
services guest work needs (host calls, that reader, the output channel). Declared here, below the
VMs and isolates that use them, so that those know the daemon only through these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .hostcalls import HostCalls


class InputReader(Protocol):
    """The hooks a thread running guest work calls, each a no-op unless that thread reads input."""

    def yield_reading(self) -> None:
        """Hand input reading to another thread before work that may keep the host waiting."""
        ...

    def wait_serving(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Wait up to `timeout_s` for `ready`, an answer that arrives as input, reading meanwhile."""
        ...


@dataclass(frozen=True)
class Runtime:
    hostcalls: HostCalls
    reader: InputReader
    send: Callable[[bytes], None]  # a frame to the host, from any thread (notifications)
    # Why every guest's host calls are refused without reaching the host: a front whose host cannot
    # answer `host.call` (an MCP client) says so here. None: the host hears them.
    refuse_host_calls: str | None = None


class NotReading:
    """The reader of work that no input-reading thread runs (tools, tests, benchmarks): a thread
    that does not read has nothing to hand over or flush, and its waits are plain waits."""

    def yield_reading(self) -> None:
        pass

    def wait_serving(self, ready: Callable[[], bool], timeout_s: float) -> None:
        pass
