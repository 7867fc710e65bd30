"""The typed operations of `protocol.client`: one method per host request, results as wire types.

Owns the shape of the Python host API that matches the Node package's (`wasm-sidecar-client`):
`load_module`, `create_vm`, `call`, `eval`, `snapshot`, `restore`, `dispose`, each one
`request` whose answer is converted to the method's result Struct from `protocol.methods_*`.
Knows nothing about ids, waiting or processes (that is `protocol.client`).

A result field this client does not know (a newer sidecar's) is dropped before the conversion,
as the spec asks of hosts, instead of failing it: the wire types refuse unknown fields because
they are the sidecar's input checks, which a host reading results should not inherit.
"""

from __future__ import annotations

import base64
from functools import cache
from typing import Any, Protocol, TypeVar

import msgspec
import msgspec.inspect as mi

from .methods_runtime import EvalResult
from .methods_vm import ModuleLoadResult, VmCallResult, VmCreateResult, VmRestoreResult, VmSnapshotResult

ResultT = TypeVar("ResultT", bound=msgspec.Struct)


class _Requester(Protocol):
    async def request(self, method: str, params: Any = None, *, timeout_s: float | None = None) -> Any: ...


class SidecarCalls:
    """Mixed into `SidecarClient`; every operation takes the method's params by name.

    A per-call `timeout_ms` is the sidecar's budget (it answers -32004 naming the limit); to stop
    waiting from the host's side, cancel the calling scope (`anyio.fail_after`, `move_on_after`,
    a task group): the request then also sends `$/cancelRequest`, so the sidecar stops the work.
    """

    async def load_module(self: _Requester, **params: Any) -> ModuleLoadResult:
        """`module.load`: exactly one of `path`, `wasm_base64`, `wat`; optionally `preinit`."""
        return _typed(await self.request("module.load", params), ModuleLoadResult)

    async def create_vm(self: _Requester, **params: Any) -> VmCreateResult:
        """`vm.create`: a module source or `runtime="python"`; `mode`, `limits`, `wasi`, `preinit`."""
        return _typed(await self.request("vm.create", params), VmCreateResult)

    async def call(
        self: _Requester,
        vm_id: str,
        export: str,
        *,
        args: list[int | float] | None = None,
        input: str | bytes | None = None,
        timeout_ms: int | None = None,
    ) -> VmCallResult:
        """`vm.call`; text `input` goes as `input`, bytes as `input_base64`."""
        params: dict[str, Any] = {"vm_id": vm_id, "export": export}
        if args is not None:
            params["args"] = args
        if isinstance(input, str):
            params["input"] = input
        elif input is not None:
            params["input_base64"] = base64.b64encode(input).decode("ascii")
        return _typed(await self.request("vm.call", _with(params, timeout_ms=timeout_ms)), VmCallResult)

    async def eval(
        self: _Requester, vm_id: str, code: str, *, stdin: str | None = None, timeout_ms: int | None = None
    ) -> EvalResult:
        """`vm.eval`: a Python exception is a result with `status == "error"`, not an exception here."""
        params = _with({"vm_id": vm_id, "code": code}, stdin=stdin, timeout_ms=timeout_ms)
        return _typed(await self.request("vm.eval", params), EvalResult)

    async def snapshot(self: _Requester, vm_id: str, path: str, *, format: str | None = None) -> VmSnapshotResult:
        """`vm.snapshot` of an idle VM to `path` on the sidecar's file system (`format` "state" or "wasm")."""
        params = _with({"vm_id": vm_id, "path": path}, format=format)
        return _typed(await self.request("vm.snapshot", params), VmSnapshotResult)

    async def restore(self: _Requester, path: str, **params: Any) -> VmRestoreResult:
        """`vm.restore`; `params` are its other fields (`limits`, `wasi`)."""
        return _typed(await self.request("vm.restore", {**params, "path": path}), VmRestoreResult)

    async def dispose(self: _Requester, vm_id: str) -> None:
        await self.request("vm.dispose", {"vm_id": vm_id})


def _with(params: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """`params` plus the optional fields that were given (absent, not null, on the wire)."""
    return {**params, **{name: value for name, value in optional.items() if value is not None}}


def _typed(result: Any, result_type: type[ResultT]) -> ResultT:
    return msgspec.convert(_known_fields(result, _info(result_type)), result_type)


@cache
def _info(result_type: type) -> mi.Type:
    return mi.type_info(result_type)


def _known_fields(value: Any, info: mi.Type) -> Any:
    """`value` without the object members `info` (and the types inside it) does not declare."""
    if isinstance(info, mi.Metadata):
        return _known_fields(value, info.type)
    if isinstance(info, mi.StructType) and isinstance(value, dict):
        fields = {field.encode_name: field.type for field in info.fields}
        return {name: _known_fields(item, fields[name]) for name, item in value.items() if name in fields}
    if isinstance(info, mi.ListType) and isinstance(value, list):
        return [_known_fields(item, info.item_type) for item in value]
    if isinstance(info, mi.DictType) and isinstance(value, dict):
        return {name: _known_fields(item, info.value_type) for name, item in value.items()}
    if isinstance(info, mi.UnionType):
        structured = [t for t in info.types if isinstance(t, (mi.StructType, mi.ListType, mi.DictType, mi.Metadata))]
        return _known_fields(value, structured[0]) if len(structured) == 1 else value
    return value
