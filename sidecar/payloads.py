"""Guest payloads between the wire's shapes and bytes, and the per-request call budget.

Owns the two conventions every guest-facing method shares: bytes travel as UTF-8 text when they
are that, else as base64 (`*_base64` fields, which msgspec decodes and encodes), and a request's
`timeout_ms` can only tighten `vm_call_timeout_ms`. Knows nothing about VMs or methods.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol.errors import InvalidParamsError

from .limits import Limits


def payload(text: Any, binary: Any) -> bytes:
    """The bytes a request carries as `text` or (already decoded) base64; empty if neither."""
    if isinstance(text, str):
        return text.encode()
    return binary if isinstance(binary, bytes) else b""


def text_or_base64(data: bytes) -> tuple[Any, Any]:
    """`(text, UNSET)` for UTF-8 bytes, else `(UNSET, bytes)` for the `*_base64` field."""
    if not data:
        return "", msgspec.UNSET
    try:
        return data.decode("utf-8"), msgspec.UNSET
    except UnicodeDecodeError:
        return msgspec.UNSET, data


def call_timeout(requested: Any, limits: Limits) -> int:
    """A per-request `timeout_ms` tightens `vm_call_timeout_ms`, never raises it."""
    if not isinstance(requested, int):
        return limits.vm_call_timeout_ms
    if requested > limits.timer_max_ms:
        raise InvalidParamsError(f"timeout_ms above timer_max_ms ({limits.timer_max_ms})", path="$.timeout_ms")
    return min(requested, limits.vm_call_timeout_ms)
