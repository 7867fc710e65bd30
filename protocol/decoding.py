"""Staged decoding of one frame into JSON-RPC items, each with the error the spec prescribes.

Stage 1 parses JSON (-32700), stage 2 checks the envelope (-32600, keeping the id when it is
readable so the host can match the error), stage 3 (method lookup, -32601) belongs to the
dispatcher, and stage 4 decodes params into the method's type (-32602 with the path of the bad
field). This module knows the envelope rules, not which methods exist.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from .envelope import JSONRPC_VERSION, RawEnvelope, RequestId
from .errors import InvalidParamsError, InvalidRequestError, ParseError, RpcError


class IncomingCall(msgspec.Struct, frozen=True):
    """A request (`id` set) or a notification (`id` is None and `notification` is true)."""

    method: str
    params: msgspec.Raw | msgspec.UnsetType
    id: RequestId | None
    notification: bool


class IncomingResponse(msgspec.Struct, frozen=True):
    """An answer to one of our own requests; `error` is the host's error object, loosely read."""

    id: RequestId | None
    result: msgspec.Raw | msgspec.UnsetType
    error: dict[str, Any] | None


class Malformed(msgspec.Struct, frozen=True):
    """An item that gets an error response (`id` null when it could not be read)."""

    error: RpcError
    id: RequestId | None


Item = IncomingCall | IncomingResponse | Malformed


class Frame(msgspec.Struct, frozen=True):
    """What one line held. `batch` frames are answered with one array of their responses."""

    items: list[Item]
    batch: bool


_envelope_decoder = msgspec.json.Decoder(RawEnvelope)
_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_any_decoder = msgspec.json.Decoder()
_PATH_IN_MESSAGE = re.compile(r" - at `(?P<path>[^`]*)`$")


def decode_frame(line: bytes) -> Frame:
    if line.lstrip()[:1] == b"[":
        return _decode_batch(line)
    return Frame([_decode_item(line)], batch=False)


def _decode_batch(line: bytes) -> Frame:
    try:
        elements = _batch_decoder.decode(line)
    except msgspec.DecodeError as exc:
        return Frame([Malformed(ParseError(f"invalid JSON: {exc}"), None)], batch=False)
    if not elements:
        return Frame([Malformed(InvalidRequestError("empty batch"), None)], batch=False)
    return Frame([_decode_item(bytes(raw)) for raw in elements], batch=True)


def _decode_item(data: bytes) -> Item:
    try:
        env = _envelope_decoder.decode(data)
    except msgspec.ValidationError as exc:
        return _refuse_shape(data, str(exc))
    except msgspec.DecodeError as exc:
        return Malformed(ParseError(f"invalid JSON: {exc}"), None)
    return _classify(env)


def _refuse_shape(data: bytes, reason: str) -> Malformed:
    """Valid JSON of the wrong shape; unless the JSON itself is broken (-32700 then)."""
    try:
        value = _any_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return Malformed(ParseError(f"invalid JSON: {exc}"), None)
    request_id = value.get("id") if isinstance(value, dict) else None
    return Malformed(InvalidRequestError(f"not a JSON-RPC 2.0 message: {reason}"), _valid_id(request_id))


def _valid_id(value: Any) -> RequestId | None:
    return value if type(value) in (str, int) else None


def _classify(env: RawEnvelope) -> Item:
    has_id = env.id is not msgspec.UNSET
    request_id = env.id if type(env.id) in (str, int) else None  # `_valid_id`, inline: on every frame
    if env.jsonrpc != JSONRPC_VERSION:
        return Malformed(InvalidRequestError('"jsonrpc" must be "2.0"'), request_id)
    if has_id and request_id is None and not (env.id is None and env.method is msgspec.UNSET):
        return Malformed(InvalidRequestError('"id" must be a string or an integer'), None)
    if env.method is not msgspec.UNSET:
        return _classify_call(env, request_id, has_id)
    if (env.result is msgspec.UNSET) == (env.error is msgspec.UNSET):
        return Malformed(InvalidRequestError('a response carries exactly one of "result" and "error"'), request_id)
    if not has_id:
        return Malformed(InvalidRequestError('a response needs an "id"'), None)
    error = None
    if env.error is not msgspec.UNSET:
        loose = _any_decoder.decode(env.error)
        error = loose if isinstance(loose, dict) else {"message": str(loose)}
    return IncomingResponse(request_id, env.result, error)


def _classify_call(env: RawEnvelope, request_id: RequestId | None, has_id: bool) -> Item:
    if not isinstance(env.method, str):
        return Malformed(InvalidRequestError('"method" must be a string'), request_id)
    if env.result is not msgspec.UNSET or env.error is not msgspec.UNSET:
        return Malformed(InvalidRequestError('a request carries no "result" or "error"'), request_id)
    if env.params is not msgspec.UNSET and bytes(env.params).lstrip()[:1] not in (b"{", b"["):
        return Malformed(InvalidRequestError('"params" must be an object or an array'), request_id)
    return IncomingCall(env.method, env.params, request_id, notification=not has_id)


def decode_params(decoder: msgspec.json.Decoder, params: msgspec.Raw | msgspec.UnsetType) -> Any:
    """Stage 4: params into the method's type; -32602 names the bad field's path."""
    raw = b"{}" if params is msgspec.UNSET else params
    if bytes(raw).lstrip()[:1] == b"[":
        raise InvalidParamsError("params must be an object (named parameters)", path="$")
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        message = str(exc)
        found = _PATH_IN_MESSAGE.search(message)
        path = found.group("path") if found else "$"
        reason = message[: found.start()] if found else message
        raise InvalidParamsError(f"invalid params: {reason}", path=path) from None
