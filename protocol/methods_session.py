"""Params and results of the session-level methods: handshake, liveness, introspection, cancel.

Owns the wire shapes of `initialize`, `ping`, `shutdown`, `sidecar.stats`, `sidecar.limits` and
`$/cancelRequest`, plus `Empty` for methods that take or return nothing. Knows nothing about
where the numbers come from (the limits inventory, the dispatcher's counters).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from .base import Wire
from .envelope import RequestId

Count = Annotated[int, Meta(ge=0)]


class Empty(Wire):
    """`{}`: the params of methods that take none (an absent `params` reads as this) and empty results."""


class PeerInfo(Wire, kw_only=True):
    """Who is on the other end; for logs and diagnostics only, never for behaviour."""

    name: str
    version: str | UnsetType = UNSET


class InitializeParams(Wire):
    """`protocol_version` is the version the host speaks; the result says which one the sidecar speaks."""

    protocol_version: Annotated[int, Meta(ge=1)] | UnsetType = UNSET
    client: PeerInfo | UnsetType = UNSET


class RuntimeInfo(Wire):
    """A runtime this installation has: `vm.create {runtime: name}` makes VMs of it."""

    name: str
    version: str
    preimported: list[str]


class Capabilities(Wire):
    """What this sidecar offers, so a host can adapt without probing."""

    methods: list[str]
    guest_abi: Annotated[int, Meta(ge=1)]
    snapshot_formats: list[Literal["state", "wasm"]]
    runtimes: list[RuntimeInfo]


class LimitRow(Wire):
    """One entry of the limits inventory with the value in force and where that value came from.

    `source` says who set `value`: the inventory `default`, the variable `env` (null for invariants,
    which nothing tunes), or a `vm` override. Amounts are whole numbers of `unit`.
    """

    name: str
    class_: Literal["guest", "runner", "protocol", "invariant"] = msgspec.field(name="class")
    env: str | None
    default: int
    value: int
    source: Literal["default", "env", "vm"]
    unit: str


class InitializeResult(Wire):
    protocol_version: Annotated[int, Meta(ge=1)]
    server: PeerInfo
    capabilities: Capabilities
    limits: list[LimitRow]


class LimitsResult(Wire):
    limits: list[LimitRow]


class DroppedResponses(Wire):
    """Host responses to `host.call` that matched no pending call, by reason; none of them is fatal."""

    stale: Count
    duplicate: Count
    unmatched: Count


class Recycles(Wire):
    """Instances of stateless VMs closed and replaced, by reason: after `vm_recycle_after_calls`
    calls, past `vm_recycle_memory_bytes` of retained memory, or after a trap (or timeout, cancel).
    `rewound`: of the `calls` ones, those set back in place to a new instance's state instead (a
    runtime's stateless VM: each eval a pristine interpreter)."""

    calls: Count
    memory: Count
    trap: Count
    rewound: Count

    @classmethod
    def of(cls, counts: dict[str, int]) -> Recycles:
        return cls(calls=counts.get("calls", 0), memory=counts.get("memory", 0), trap=counts.get("trap", 0),
                   rewound=counts.get("rewound", 0))


class StatsResult(Wire):
    """Process-wide counters since start; `host_calls_pending` counts calls awaiting a host answer;
    `vms_starting` the VMs being created or restored (compile included), which count against
    `runner_vms` like live ones.

    `vm_calls`, `vm_memory_bytes` (linear memory retained by live instances) and
    `instances_recycled` sum over the live VMs; `engines` counts the wasmtime engines kept (one
    per engine setting in use or kept for reuse, at most `runner_engines`).

    `hibernations` and `wakes` count VMs that left memory and came back since start (a stateless
    VM's dropped instances included); `state_bytes` is what the state directory holds (hibernated
    VMs' state and their modules, each module once); `state_quarantined` counts state files that
    failed validation and were moved aside. `spare_instances` counts instances made ahead for the
    next `vm.create` of their module (at most `runner_spare_instances`), live stores outside any VM.
    """

    requests_served: Count
    requests_in_flight: Count
    responses_dropped: DroppedResponses
    host_calls_pending: Count
    engines: Count
    vms: Count
    vms_starting: Count
    vm_calls: Count
    vm_memory_bytes: Count
    instances_recycled: Recycles
    hibernations: Count
    wakes: Count
    state_bytes: Count
    state_quarantined: Count
    uptime_ms: Count
    spare_instances: Count


class CancelParams(Wire):
    """Names a request of the host's still in flight; unknown or finished ids are ignored."""

    id: RequestId
