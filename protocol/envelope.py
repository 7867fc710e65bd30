"""JSON-RPC 2.0 envelope types: the shapes every message on the wire has, in both directions.

Owns the outer layer only (`jsonrpc`, `id`, `method`, `params`, `result`, `error`); method params
and results live in `protocol.methods`. Decoding untrusted bytes into these happens in stages in
`protocol.decoding`; this module only declares the shapes and encodes them.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .base import Wire

# The JSON-RPC spec allows null ids only in error responses to unreadable requests.
RequestId = str | int
JSONRPC_VERSION = "2.0"


class ErrorObject(Wire):
    code: int
    message: str
    data: Any = msgspec.UNSET


class Request(Wire, kw_only=True, omit_defaults=False):
    """A call that expects exactly one response with the same `id`."""

    jsonrpc: Literal["2.0"] = JSONRPC_VERSION
    id: RequestId
    method: str
    params: msgspec.Raw | Any = msgspec.UNSET


class Notification(Wire, kw_only=True, omit_defaults=False):
    """A call without an `id`: never answered, not even with an error."""

    jsonrpc: Literal["2.0"] = JSONRPC_VERSION
    method: str
    params: msgspec.Raw | Any = msgspec.UNSET


class Response(Wire, kw_only=True, omit_defaults=False):
    """Exactly one of `result` and `error` is set; `id` is null only for unreadable requests."""

    jsonrpc: Literal["2.0"] = JSONRPC_VERSION
    id: RequestId | None
    result: msgspec.Raw | Any = msgspec.UNSET
    error: ErrorObject | msgspec.UnsetType = msgspec.UNSET


class RawEnvelope(Wire):
    """Stage-one view of any incoming object: every member optional and still undecoded.

    Unknown top-level members are refused: the 2.0 spec defines the whole envelope.
    """

    jsonrpc: Any = msgspec.UNSET
    id: Any = msgspec.UNSET
    method: Any = msgspec.UNSET
    params: msgspec.Raw = msgspec.UNSET
    result: msgspec.Raw = msgspec.UNSET
    error: msgspec.Raw = msgspec.UNSET


# `jsonrpc` has a default but must always be written: the envelopes keep defaults on output and
# rely on UNSET, which msgspec always omits, for absent members.
_encoder = msgspec.json.Encoder()


def encode(message: Wire) -> bytes:
    """One frame: compact JSON and the terminating newline."""
    return _encoder.encode(message) + b"\n"
