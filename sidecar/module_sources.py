"""Module sources: the bytes a request names (a path, inline bytes, WebAssembly text) and their id.

Owns reading a source within `runner_module_bytes` (a path through `sidecar.hostfiles`), turning
WebAssembly text into a binary with wasmtime's message on failure (`parse`), the content address
(`module_id`, the sha256 of the bytes as given), and the one-line form of a wasmtime error.
Knows nothing about compiling, the module table or the compile cache's entries.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import wasmtime
from msgspec import UNSET

from protocol.errors import InvalidModuleError, InvalidParamsError

from .hostfiles import TooLarge, read_bounded
from .limits import Limits

_SOURCES = ("path", "wasm_base64", "wat")


def content_id(wasm: bytes) -> str:
    """The `module_id` of a module's bytes."""
    return "sha256:" + hashlib.sha256(wasm).hexdigest()


def read_source(params: Any, limits: Limits) -> bytes:
    """The module bytes named by `params` (`path`, `wasm_base64` or `wat`), within `runner_module_bytes`."""
    given = [name for name in _SOURCES if getattr(params, name, UNSET) is not UNSET]
    if len(given) != 1:
        raise InvalidParamsError("exactly one of path, wasm_base64, wat names the module", path="$")
    capacity = limits.runner_module_bytes
    if given[0] == "path":
        data = _read_file(params.path, limits)
    elif given[0] == "wasm_base64":
        data = params.wasm_base64  # msgspec has decoded the base64 already
    else:
        text = params.wat.encode()
        if len(text) > capacity:  # bounds the text parser's work too
            raise limits.exceeded("runner_module_bytes", len(text), module_source="wat")
        try:
            data = bytes(wasmtime.wat2wasm(text))
        except wasmtime.WasmtimeError as exc:
            raise InvalidModuleError(f"invalid WebAssembly text: {error_summary(exc)}", stage="parse") from None
    if len(data) > capacity:
        raise limits.exceeded("runner_module_bytes", len(data), module_source=given[0])
    return data


def _read_file(path: str, limits: Limits) -> bytes:
    try:
        return read_bounded(path, limits.runner_module_bytes)
    except TooLarge as exc:
        raise limits.exceeded("runner_module_bytes", exc.size, path=path) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InvalidModuleError(f"cannot read module {path!r}: {reason}", stage="read", path=path) from None


def error_summary(exc: Exception) -> str:
    """The informative line of a wasmtime message: the root cause of a chain, or the first line
    with its text position."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "Caused by:" in lines:
        return re.sub(r"^\d+: ", "", lines[-1])
    where = next((line[4:] for line in lines if line.startswith("--> ")), None)
    return f"{lines[0]} (at {where})" if where else lines[0]
