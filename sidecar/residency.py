"""What the VM registry tells hibernation: an interface, and the no-op the registry starts with.

The registry (`sidecar.vms`) keeps every VM, resident or hibernated; which of them stay in memory
is `sidecar.hibernation`'s business. The registry tells it of each VM as it joins (before the host
hears of it, so an exit that follows at once finds it to keep), of each VM once its answer is out
(a resident cap may then make another one hibernate) and of each VM a host disposes (its state
leaves the disk).
Declared here, below both, so that the registry knows hibernation only through it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

from .vm import Vm


def rfc3339(wall: float) -> str:
    """A wall-clock time (`time.time()`) as RFC 3339 in UTC, to the millisecond."""
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def resident(vm: Vm) -> bool:
    """In memory: not hibernated (a stateful VM's state on disk, a stateless one's instances dropped)."""
    return vm.revive is None and (vm.instances > 0 or vm.mode == "stateful" or vm.busy)


class Residency(Protocol):
    def joined(self, vm: Vm) -> None: ...

    def went_live(self, vm: Vm) -> None: ...

    def disposed(self, vm: Vm) -> None: ...


class NoResidency:
    """Every VM stays in memory until disposed."""

    def joined(self, vm: Vm) -> None:
        pass

    def went_live(self, vm: Vm) -> None:
        pass

    def disposed(self, vm: Vm) -> None:
        pass
