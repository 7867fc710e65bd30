"""Error codes and the typed errors that carry them.

Owns the mapping from failure to JSON-RPC code and `data.kind`: every error the sidecar puts on
the wire is one of these classes, so the table lives in exactly one place. Knows nothing about
wasmtime or the daemon; callers translate their own failures into these at the edge.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, ClassVar


class ErrorCode(IntEnum):
    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    VM_NOT_FOUND = -32001
    LIMIT_EXCEEDED = -32002
    TRAP = -32003
    TIMEOUT = -32004
    INVALID_MODULE = -32005
    INVALID_SNAPSHOT = -32006
    HOST_CALL_FAILED = -32007
    OVERLOADED = -32008
    CANCELLED = -32800


def env_var_for(limit: str) -> str:
    """The environment variable that tunes a limit (the design's naming rule)."""
    return "SIDECAR_" + limit.upper()


class RpcError(Exception):
    """A failure that becomes one JSON-RPC error object: `code`, `message`, `data`."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR
    kind: ClassVar[str] = "internal"

    def __init__(self, message: str, /, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    @property
    def data(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.details}

    def to_wire(self) -> dict[str, Any]:
        return {"code": int(self.code), "message": self.message, "data": self.data}


class ParseError(RpcError):
    code = ErrorCode.PARSE_ERROR
    kind = "parse_error"


class InvalidRequestError(RpcError):
    code = ErrorCode.INVALID_REQUEST
    kind = "invalid_request"


class MethodNotFoundError(RpcError):
    code = ErrorCode.METHOD_NOT_FOUND
    kind = "method_not_found"


class InvalidParamsError(RpcError):
    """Bad params; `path` is a JSON path such as `$.limits.vm_fuel` naming the bad field."""

    code = ErrorCode.INVALID_PARAMS
    kind = "invalid_params"

    def __init__(self, message: str, /, *, path: str = "$", **details: Any) -> None:
        super().__init__(message, path=path, **details)


class InternalError(RpcError):
    code = ErrorCode.INTERNAL_ERROR
    kind = "internal"


class VmNotFoundError(RpcError):
    code = ErrorCode.VM_NOT_FOUND
    kind = "vm_not_found"

    def __init__(self, vm_id: str) -> None:
        super().__init__(f"no VM with id {vm_id!r}", vm_id=vm_id)


class LimitExceededError(RpcError):
    """A budget bit: names the limit, the variable that raises it, how big it is, what was asked."""

    code = ErrorCode.LIMIT_EXCEEDED
    kind = "limit_exceeded"

    def __init__(
        self, limit: str, *, capacity: int | float, observed: int | float, message: str | None = None, **details: Any
    ) -> None:
        text = message or f"{limit} exceeded: {observed} > {capacity} (raise with {env_var_for(limit)})"
        super().__init__(
            text, limit=limit, env=env_var_for(limit), capacity=capacity, observed=observed, **details
        )


class GuestTrapError(RpcError):
    code = ErrorCode.TRAP
    kind = "trap"

    def __init__(self, trap_code: str, message: str, /, **details: Any) -> None:
        super().__init__(f"guest trapped: {trap_code}", trap_code=trap_code, message=message, **details)


class CallTimeoutError(RpcError):
    code = ErrorCode.TIMEOUT
    kind = "timeout"

    def __init__(self, *, limit: str, capacity: int | float, **details: Any) -> None:
        super().__init__(
            f"{limit} reached after {capacity} ms (raise with {env_var_for(limit)})",
            limit=limit,
            env=env_var_for(limit),
            capacity=capacity,
            **details,
        )


class InvalidModuleError(RpcError):
    """`stage` says what failed: `parse`, `validate`, `imports`, `exports`, `read`."""

    code = ErrorCode.INVALID_MODULE
    kind = "invalid_module"

    def __init__(self, message: str, /, *, stage: str, **details: Any) -> None:
        super().__init__(message, stage=stage, **details)


class InvalidSnapshotError(RpcError):
    """`stage` says what failed: `format`, `version`, `checksum`, `module`, `bounds`, `read`."""

    code = ErrorCode.INVALID_SNAPSHOT
    kind = "invalid_snapshot"

    def __init__(self, message: str, /, *, stage: str, **details: Any) -> None:
        super().__init__(message, stage=stage, **details)


class HostCallFailedError(RpcError):
    code = ErrorCode.HOST_CALL_FAILED
    kind = "host_call_failed"


class OverloadedError(RpcError):
    """Too much in flight; names the bound as a limit so the host knows what to raise."""

    code = ErrorCode.OVERLOADED
    kind = "overloaded"

    def __init__(self, limit: str, *, capacity: int, observed: int) -> None:
        super().__init__(
            f"{limit} reached: {observed} in flight (raise with {env_var_for(limit)})",
            limit=limit,
            env=env_var_for(limit),
            capacity=capacity,
            observed=observed,
        )


class RequestCancelledError(RpcError):
    code = ErrorCode.CANCELLED
    kind = "cancelled"
