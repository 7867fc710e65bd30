"""Params and results of the module and VM methods, and of the two messages the sidecar sends.

Owns the wire shapes of `module.load`, `vm.*`, `host.call` and `vm.output`: field names, types
and the constraints a decoder can check on its own. Rules that span fields (exactly one module
source, at most one input encoding) are declared in the registry in `protocol.methods`. Knows
nothing about wasmtime, the limits inventory or how a VM runs; `*_base64` fields are `bytes`
here, so msgspec checks and decodes the base64 itself.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from msgspec import UNSET, Meta, UnsetType

from .base import Wire
from .envelope import RequestId
from .methods_session import Count, Recycles

VmId = Annotated[str, Meta(min_length=1, description="Opaque id chosen by the sidecar.")]
ModuleId = Annotated[str, Meta(pattern=r"^sha256:[0-9a-f]{64}$", description="Content address of a module.")]
Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
HostPath = Annotated[str, Meta(min_length=1, description="A path on the sidecar's file system.")]
Millis = Annotated[float, Meta(ge=0)]
TimeoutMs = Annotated[
    int, Meta(ge=0, description="Tightens vm_call_timeout_ms for this request; it can never raise it.")
]
# i32/i64/f32/f64 all travel as JSON numbers; msgspec refuses booleans here, as it should.
Number = int | float
# Values are numbers or strings with a unit ("64MiB"); the limits inventory parses and bounds them.
LimitOverrides = Annotated[
    dict[str, int | str],  # values are checked by name, so an error can name the limit
    Meta(description="Per-VM budgets by limit name; may only tighten the sidecar's own value."),
]


class ExportInfo(Wire):
    """One export of a module; `params`/`results` are wasm value types and only set for functions."""

    name: str
    kind: str
    params: list[str] | UnsetType = UNSET
    results: list[str] | UnsetType = UNSET


class ImportInfo(Wire, kw_only=True):
    """One import of a module, as `module`.`name`; a guest may import only what the sidecar provides."""

    module: str
    name: str
    kind: str
    params: list[str] | UnsetType = UNSET
    results: list[str] | UnsetType = UNSET


class Preopen(Wire, kw_only=True):
    """A host directory the guest sees at `guest_path`; read-only unless `writable`."""

    host_path: HostPath
    guest_path: Annotated[str, Meta(min_length=1)]
    writable: bool = False


class WasiSettings(Wire):
    """The VM's WASI view; nothing of the host is visible to the guest unless listed here."""

    args: list[str] = []
    env: dict[str, str] = {}
    preopens: list[Preopen] = []


class PreinitSpec(Wire, kw_only=True):
    """Pre-initialization: `export` (`() -> ()`, or `() -> i32` where nonzero is failure) runs once
    with the WASI view `wasi`, and the state it leaves is baked into a new module."""

    export: Annotated[str, Meta(min_length=1)]
    wasi: WasiSettings | UnsetType = UNSET


class ModuleLoadParams(Wire):
    """Exactly one source: a file the sidecar can read, the binary inline, or WebAssembly text.
    With `preinit`, the module loaded is the source pre-initialized by that export (contract v1.1)."""

    path: HostPath | UnsetType = UNSET
    wasm_base64: bytes | UnsetType = UNSET
    wat: str | UnsetType = UNSET
    preinit: PreinitSpec | UnsetType = UNSET


class ModuleLoadResult(Wire, kw_only=True):
    """`cached` is true when the compiled module came from the compile cache instead of a compile.
    After a `preinit`, everything describes the baked module, and `preinit_ms`/`preinit_cached` are set."""

    module_id: ModuleId
    size_bytes: Count
    exports: list[ExportInfo]
    imports: list[ImportInfo]
    cached: bool
    compile_ms: Millis
    preinit_ms: Millis | UnsetType = UNSET
    preinit_cached: bool | UnsetType = UNSET


class VmCreateParams(Wire):
    """Exactly one of `module_id`, `path`, `wasm_base64`, `wat` names the VM's module, or `runtime` a
    sidecar-provided guest (listed in `initialize`'s capabilities), which the sidecar pre-initializes."""

    runtime: Literal["python"] | UnsetType = UNSET
    module_id: ModuleId | UnsetType = UNSET
    path: HostPath | UnsetType = UNSET
    wasm_base64: bytes | UnsetType = UNSET
    wat: str | UnsetType = UNSET
    mode: Literal["stateful", "stateless"] = "stateful"
    limits: LimitOverrides | UnsetType = UNSET
    wasi: WasiSettings | UnsetType = UNSET
    preinit: PreinitSpec | UnsetType = UNSET


class VmCreateResult(Wire, kw_only=True):
    """`module_id`, `preinit_ms` and `preinit_cached` are set after a `preinit`: the VM runs the baked module."""

    vm_id: VmId
    module_id: ModuleId | UnsetType = UNSET
    preinit_ms: Millis | UnsetType = UNSET
    preinit_cached: bool | UnsetType = UNSET


class VmCallParams(Wire, kw_only=True):
    """Calls export `export`; at most one of `input` (UTF-8 text) and `input_base64`."""

    vm_id: VmId
    export: Annotated[str, Meta(min_length=1)]
    args: list[Number] = []
    input: str | UnsetType = UNSET
    input_base64: bytes | UnsetType = UNSET
    timeout_ms: TimeoutMs | UnsetType = UNSET


class VmCallResult(Wire, kw_only=True):
    """The guest's output is `output` when it is valid UTF-8, `output_base64` otherwise."""

    results: list[Number]
    output: str | UnsetType = UNSET
    output_base64: bytes | UnsetType = UNSET
    elapsed_ms: Millis
    fuel_used: Count | UnsetType = UNSET


class VmRunParams(Wire, kw_only=True):
    """Runs `_start` in a fresh instance; `args` follow the VM's WASI args, `env` overrides its env.

    `stream` (extension) sends stdout/stderr as `vm.output` notifications while the run goes on.
    """

    vm_id: VmId
    args: list[str] = []
    env: dict[str, str] = {}
    stdin: str | UnsetType = UNSET
    stdin_base64: bytes | UnsetType = UNSET
    timeout_ms: TimeoutMs | UnsetType = UNSET
    stream: bool = False


class VmRunResult(Wire, kw_only=True):
    """Each stream is text when valid UTF-8, `*_base64` otherwise; empty when it was streamed."""

    exit_code: int
    stdout: str | UnsetType = UNSET
    stdout_base64: bytes | UnsetType = UNSET
    stderr: str | UnsetType = UNSET
    stderr_base64: bytes | UnsetType = UNSET
    stdout_truncated: bool
    stderr_truncated: bool
    elapsed_ms: Millis


SnapshotFormat = Literal["state", "wasm"]
SNAPSHOT_FORMATS: tuple[str, ...] = get_args(SnapshotFormat)  # what `vm.snapshot` writes, as `initialize` lists them


class VmSnapshotParams(Wire, kw_only=True):
    """`state` resumes in a sidecar; `wasm` is a pre-initialized module any runtime can run."""

    vm_id: VmId
    path: HostPath
    format: SnapshotFormat = "state"


class VmSnapshotResult(Wire):
    path: HostPath
    size_bytes: Count
    sha256: Sha256Hex


class VmRestoreParams(Wire):
    """`limits` applies to the restored VM as it would to `vm.create`. `wasi` (extension) sets its
    WASI view; without it the snapshot's args and env are kept and its preopens dropped, since a
    snapshot file must not grant access to host directories."""

    path: HostPath
    limits: LimitOverrides | UnsetType = UNSET
    wasi: WasiSettings | UnsetType = UNSET


class PendingHostCall(Wire):
    """An async `host.call` the VM was waiting on when snapshotted; answer it by this `id`."""

    id: str
    method: str
    params: Any


class VmRestoreResult(Wire):
    vm_id: VmId
    pending_host_calls: list[PendingHostCall]


class VmDisposeParams(Wire):
    vm_id: VmId


class VmHibernateParams(Wire):
    vm_id: VmId


class VmInfo(Wire):
    """One VM. `memory_bytes` sums linear memory over its live instances; `recycles` counts
    the instances a stateless VM retired, by reason. `resident` is false for a VM that hibernated
    (its state on disk; the next request naming it wakes it) and for a stateless one holding no
    instance; `last_used` (RFC 3339, UTC) is when a request or a host answer last reached it."""

    vm_id: VmId
    mode: Literal["stateful", "stateless"]
    module_id: ModuleId
    state: Literal["idle", "busy"]
    memory_bytes: Count
    calls: Count
    instances: Count
    host_calls_pending: Count
    recycles: Recycles
    resident: bool
    last_used: str


class VmListResult(Wire):
    vms: list[VmInfo]


class HostCallParams(Wire):
    """A guest's request to the host; `params` is the JSON the guest passed, `null` when it passed none."""

    vm_id: VmId
    method: str
    params: Any


class VmOutputParams(Wire, kw_only=True):
    """A chunk of a streamed run's output: `data` when valid UTF-8, `data_base64` otherwise.

    `request_id` (extension) is the id of the `vm.run` that produced it.
    """

    vm_id: VmId
    stream: Literal["stdout", "stderr"]
    data: str | UnsetType = UNSET
    data_base64: bytes | UnsetType = UNSET
    request_id: RequestId | UnsetType = UNSET

