"""The method registry of wire contract v1: every method, its params and result types, direction.

Owns `METHODS`, the one table that the dispatcher, the host client, the JSON Schema and the spec
read; the cross-field rules msgspec cannot express (`require_one_of`, run by `MethodSpec.check`
after decoding, since a `__post_init__` error would reach the host as a generic validation
message); and one cached params decoder per type. The shapes themselves live in
`protocol.methods_session`, `protocol.methods_vm` and `protocol.methods_runtime` and are
re-exported here. Knows nothing
about how a method is carried out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from .errors import InvalidParamsError, MethodNotFoundError
from .methods_runtime import EvalError, EvalParams, EvalResult
from .methods_session import (
    CancelParams,
    Capabilities,
    DroppedResponses,
    Empty,
    InitializeParams,
    InitializeResult,
    LimitRow,
    LimitsResult,
    PeerInfo,
    Recycles,
    RuntimeInfo,
    StatsResult,
)
from .methods_vm import (
    ExportInfo,
    HostCallParams,
    ImportInfo,
    ModuleLoadParams,
    ModuleLoadResult,
    PendingHostCall,
    PreinitSpec,
    Preopen,
    VmCallParams,
    VmCallResult,
    VmCreateParams,
    VmCreateResult,
    VmDisposeParams,
    VmHibernateParams,
    VmInfo,
    VmListResult,
    VmOutputParams,
    VmRestoreParams,
    VmRestoreResult,
    VmRunParams,
    VmRunResult,
    VmSnapshotParams,
    VmSnapshotResult,
    WasiSettings,
)

MODULE_SOURCES = ("path", "wasm_base64", "wat")


def require_one_of(params: Any, fields: Iterable[str], path: str = "$", *, required: bool = True) -> None:
    """Refuse `params` unless exactly one of `fields` is set (at most one when not `required`).

    `path` is the JSON path of `params` itself; a conflict points at the second field given.
    """
    fields = tuple(fields)
    given = []
    for name in fields:  # a loop, not a comprehension: this runs on every request that has the rule
        if getattr(params, name, msgspec.UNSET) is not msgspec.UNSET:
            given.append(name)
    if len(given) == 1 or (not given and not required):
        return
    rule = f"give {'exactly' if required else 'at most'} one of " + ", ".join(f"`{name}`" for name in fields)
    if given:
        raise InvalidParamsError(f"{rule}; got {', '.join(given)}", path=f"{path}.{given[1]}", one_of=list(fields))
    raise InvalidParamsError(rule, path=path, one_of=list(fields))


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """One method. `params` is always a type (`Empty` when it takes none, so an absent `params`
    decodes as `{}`); `result` is None for notifications and `Any` where any JSON is allowed.
    `one_of` names fields of which exactly one (or at most one, unless `one_of_required`) is set.
    """

    name: str
    params: type
    result: Any
    direction: Literal["host_to_sidecar", "sidecar_to_host"]
    notification: bool
    summary: str
    one_of: tuple[str, ...] = ()
    one_of_required: bool = False

    def check(self, params: Any) -> None:
        """The rules decoding cannot enforce; call it on the decoded params, it raises -32602."""
        if self.one_of:
            require_one_of(params, self.one_of, required=self.one_of_required)


def _host(name: str, params: type, result: Any, summary: str, **rules: Any) -> MethodSpec:
    return MethodSpec(name, params, result, "host_to_sidecar", result is None, summary, **rules)


def _sidecar(name: str, params: type, result: Any, summary: str, **rules: Any) -> MethodSpec:
    return MethodSpec(name, params, result, "sidecar_to_host", result is None, summary, **rules)


_SPECS = [
    _host("initialize", InitializeParams, InitializeResult,
          "Handshake: learn the protocol version, capabilities and limits of the sidecar."),
    _host("ping", Empty, Empty, "Liveness check; answers `{}`."),
    _host("shutdown", Empty, Empty, "Answer `{}`, then dispose every VM and exit with status 0."),
    _host("module.load", ModuleLoadParams, ModuleLoadResult,
          "Compile a module (or take it from the compile cache) and return its content address.",
          one_of=MODULE_SOURCES, one_of_required=True),
    _host("vm.create", VmCreateParams, VmCreateResult,
          "Create a VM from a module or a runtime, with its mode, budgets and WASI view.",
          one_of=("module_id", *MODULE_SOURCES, "runtime"), one_of_required=True),
    _host("vm.call", VmCallParams, VmCallResult,
          "Call an export with numeric args and optional input; return its results and output.",
          one_of=("input", "input_base64")),
    _host("vm.run", VmRunParams, VmRunResult,
          "Run the module's WASI `_start` in a fresh instance; return exit code, stdout and stderr.",
          one_of=("stdin", "stdin_base64")),
    _host("vm.snapshot", VmSnapshotParams, VmSnapshotResult,
          "Write an idle VM to a file, as a resumable state or a pre-initialized module."),
    _host("vm.restore", VmRestoreParams, VmRestoreResult,
          "Resume a VM from a state snapshot, with the host calls it was waiting on."),
    _host("vm.eval", EvalParams, EvalResult,
          "Run code in a runtime VM's interpreter; return its status, value, output and exception."),
    _host("vm.dispose", VmDisposeParams, Empty, "End a VM and free its instances; its host calls become stale."),
    _host("vm.hibernate", VmHibernateParams, Empty,
          "Move an idle VM's state to the state directory and free its memory; it wakes on demand."),
    _host("vm.list", Empty, VmListResult, "Describe every VM, resident or hibernated."),
    _host("sidecar.stats", Empty, StatsResult,
          "Process-wide counters: requests, dropped responses, pending host calls, VMs, uptime."),
    _host("sidecar.limits", Empty, LimitsResult, "Every limit with the value in force and where it came from."),
    _host("$/cancelRequest", CancelParams, None, "Ask that a request still in flight end with -32800."),
    _sidecar("host.call", HostCallParams, Any, "A guest asks the host; the host answers with any JSON or an error."),
    _sidecar("vm.output", VmOutputParams, None, "A chunk of a streaming `vm.run`'s stdout or stderr.",
             one_of=("data", "data_base64"), one_of_required=True),
]  # fmt: skip
METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}

# Made on first use, not at import: building all of them took ~3 ms of every cold start, most of
# them for methods served only once the VM services load, after the first answer.
_decoders: dict[type, msgspec.json.Decoder] = {}


def params_decoder(method: str) -> msgspec.json.Decoder:
    """The shared decoder for `method`'s params; -32601 for a method the contract lacks."""
    spec = METHODS.get(method)
    if spec is None:
        raise MethodNotFoundError(f"unknown method {method!r}", method=method)
    return decoder_for(spec.params)


def decoder_for(params: type) -> msgspec.json.Decoder:
    """The shared decoder for a params type, of this contract's methods or another method table's
    (the MCP front's): one per type for the life of the process."""
    decoder = _decoders.get(params)
    if decoder is None:
        decoder = _decoders[params] = msgspec.json.Decoder(params)
    return decoder


__all__ = [
    "METHODS",
    "MODULE_SOURCES",
    "CancelParams",
    "Capabilities",
    "DroppedResponses",
    "Empty",
    "EvalError",
    "EvalParams",
    "EvalResult",
    "ExportInfo",
    "HostCallParams",
    "ImportInfo",
    "InitializeParams",
    "InitializeResult",
    "LimitRow",
    "LimitsResult",
    "MethodSpec",
    "decoder_for",
    "ModuleLoadParams",
    "ModuleLoadResult",
    "PeerInfo",
    "Recycles",
    "RuntimeInfo",
    "PendingHostCall",
    "PreinitSpec",
    "Preopen",
    "StatsResult",
    "VmCallParams",
    "VmCallResult",
    "VmCreateParams",
    "VmCreateResult",
    "VmDisposeParams",
    "VmHibernateParams",
    "VmInfo",
    "VmListResult",
    "VmOutputParams",
    "VmRestoreParams",
    "VmRestoreResult",
    "VmRunParams",
    "VmRunResult",
    "VmSnapshotParams",
    "VmSnapshotResult",
    "WasiSettings",
    "params_decoder",
    "require_one_of",
]
