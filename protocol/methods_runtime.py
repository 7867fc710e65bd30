"""Params and results of `vm.eval`, contract v1.1: code run in a runtime VM's interpreter.

Owns the wire shapes of `vm.eval`: code in, and the status, value, captured streams and exception
of running it out (a runtime as `initialize` lists it is `methods_session.RuntimeInfo`). A Python exception is a result
(`status: "error"`), not a protocol error. Knows nothing about how a runtime is built or run.
"""

from __future__ import annotations

from typing import Literal

from msgspec import UNSET, UnsetType

from .base import Wire
from .methods_vm import Millis, TimeoutMs, VmId


class EvalParams(Wire, kw_only=True):
    """Runs `code` in the VM's interpreter; `stdin` is what the code reads from `sys.stdin`."""

    vm_id: VmId
    code: str
    stdin: str | UnsetType = UNSET
    timeout_ms: TimeoutMs | UnsetType = UNSET


class EvalError(Wire):
    """The exception that ended the code: its type (qualified outside builtins), message, traceback."""

    type: str
    message: str
    traceback: str


class EvalResult(Wire, kw_only=True):
    """`value` is the repr of a trailing expression; `exit_code` is set when the code raised `SystemExit`."""

    status: Literal["ok", "error", "exit"]
    value: str | UnsetType = UNSET
    stdout: str
    stderr: str
    error: EvalError | UnsetType = UNSET
    exit_code: int | UnsetType = UNSET
    elapsed_ms: Millis
