"""Staged decoding of one frame into JSON-RPC items, each with the error the spec prescribes.

Stage 1 parses JSON (-32700; bytes that are not UTF-8 are not JSON text either), stage 2 checks
the envelope (-32600, keeping the id when it is readable so the host can match the error), stage
3 (method lookup, -32601) belongs to the dispatcher, and stage 4 decodes params into the method's
type (-32602 with the path of the bad field). This module knows the envelope rules, not which
methods exist. The common frame, a plain request, skips stages 1 and 2: one typed decode accepts
exactly the plain requests the stages would pass, and whatever it refuses goes through them, so
a frame's verdict never depends on which path read it (`tests/test_common_frames.py`).

Decoding never raises on hostile input: a value nested deeper than the decoder's recursion allows
is refused (-32600) like any other frame we cannot take, with the id recovered when a shallow
scan finds it, and `recover_id` serves callers that must answer a frame they failed to handle.
"""

from __future__ import annotations

import re
from typing import Any, Literal

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


class _PlainCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The common frame, a single request with a string or integer id, decoded in one step.
    A frame of any other shape fails to decode into it and takes the staged path."""

    jsonrpc: Literal["2.0"]
    id: RequestId
    method: str
    params: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


Item = IncomingCall | IncomingResponse | Malformed


class Frame(msgspec.Struct, frozen=True):
    """What one line held. `batch` frames are answered with one array of their responses."""

    items: list[Item]
    batch: bool


_plain_decoder = msgspec.json.Decoder(_PlainCall)
_envelope_decoder = msgspec.json.Decoder(RawEnvelope)
_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_any_decoder = msgspec.json.Decoder()
_PATH_IN_MESSAGE = re.compile(r" - at `(?P<path>[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")
# What `recover_id` looks at: strings (escapes kept whole), brackets, and `:` and `,`.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:,]')
# Tokens `recover_id` reads before it gives up: the id of a well-formed message comes near its
# start, and a hostile frame must not buy more than about a millisecond of scanning.
_ID_SCAN_TOKENS = 4096


def decode_frame(line: bytes) -> Frame:
    if line.isascii():  # the common frame is ASCII, and that check costs nanoseconds
        # A frame naming no method (a host's answer to `host.call`) would only fail the one-step
        # decode, which costs ~0.5 µs when it raises; the search costs ~0.05.
        if b'"method"' in line:
            try:  # a plain request (string or integer id, params an object or absent) in one step
                plain = _plain_decoder.decode(line)
            except (msgspec.DecodeError, RecursionError):
                pass  # any other shape: the staged path says what is wrong with it, if anything
            else:
                params = plain.params
                if params is msgspec.UNSET or bytes(params)[:1] == b"{":
                    return Frame([IncomingCall(plain.method, params, plain.id, notification=False)], batch=False)
    else:
        refused = _refuse_non_utf8(line)
        if refused is not None:
            return Frame([refused], batch=False)
    try:
        if line.lstrip()[:1] == b"[":
            return _decode_batch(line)
        return Frame([_decode_item(line)], batch=False)
    except RecursionError:  # msgspec skips even `Raw` members recursively
        too_deep = InvalidRequestError("JSON nested too deeply to decode", reason="nesting")
        return Frame([Malformed(too_deep, recover_id(line))], batch=False)


def _refuse_non_utf8(line: bytes) -> Malformed | None:
    """JSON text is UTF-8; the decoder does not check the bytes of members it keeps raw."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as exc:
        error = ParseError(f"invalid JSON: not UTF-8 at byte {exc.start}", offset=exc.start)
        return Malformed(error, recover_id(line.decode("utf-8", errors="replace").encode()))
    return None


def recover_id(line: bytes) -> RequestId | None:
    """The id of a single message that cannot be decoded whole, if a shallow scan finds one.

    Looks only at the top-level object's members, and only within `_ID_SCAN_TOKENS` tokens; an
    id that is not a plain integer or string, or that holds a replaced (non-UTF-8) character, is
    not one the host could match, so it reads as None.
    """
    depth, key, expect_value = 0, None, False
    for count, token in enumerate(_TOKEN.finditer(line)):
        text = token.group()
        if count == _ID_SCAN_TOKENS or (depth == 0 and text != b"{"):
            return None
        if text in (b"{", b"["):
            depth += 1
        elif text in (b"}", b"]"):
            depth -= 1
        elif depth == 1 and text == b":":
            expect_value = True
            if key == b'"id"':
                return _id_after(line, token.end())
        elif depth == 1 and text == b",":
            expect_value = False
        elif depth == 1 and not expect_value:
            key = text
    return None


def _id_after(line: bytes, start: int) -> RequestId | None:
    found = re.match(rb'\s*(-?\d{1,40}|"(?:[^"\\]|\\.){0,4096}")\s*[,}]', line[start : start + 4200])
    if found is None:
        return None
    try:
        value = _any_decoder.decode(found.group(1))
    except msgspec.DecodeError:
        return None
    if isinstance(value, str) and "\ufffd" in value:
        return None
    return _valid_id(value)


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
        return Malformed(ParseError(f"invalid JSON: {exc}"), recover_id(data))
    return _classify(env)


def _refuse_shape(data: bytes, reason: str) -> Malformed:
    """Valid JSON of the wrong shape; unless the JSON itself is broken (-32700 then)."""
    try:
        value = _any_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return Malformed(ParseError(f"invalid JSON: {exc}"), recover_id(data))
    if not isinstance(value, dict):
        shape = f"a JSON-RPC 2.0 message is an object (a batch: an array of them), not {_json_type(value)}"
        return Malformed(InvalidRequestError(shape), None)
    unknown = _UNKNOWN_FIELD.search(reason)
    if unknown is not None:
        reason = f'unknown member "{unknown.group(1)}" (the envelope has jsonrpc, id, method, params, result, error)'
    return Malformed(InvalidRequestError(f"not a JSON-RPC 2.0 message: {reason}"), _valid_id(value.get("id")))


def _wrong_version(value: Any) -> InvalidRequestError:
    if value is msgspec.UNSET:
        return InvalidRequestError('"jsonrpc": "2.0" is missing', missing="jsonrpc")
    return InvalidRequestError(f'"jsonrpc" must be the string "2.0", not {msgspec.json.encode(value).decode()[:40]}')


def _json_type(value: Any) -> str:
    """How a host author would name the JSON type they sent."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), "a value of another type")


def _valid_id(value: Any) -> RequestId | None:
    return value if type(value) in (str, int) else None


def _classify(env: RawEnvelope) -> Item:
    has_id = env.id is not msgspec.UNSET
    request_id = env.id if type(env.id) in (str, int) else None  # `_valid_id`, inline: on every frame
    if env.jsonrpc != JSONRPC_VERSION:
        return Malformed(_wrong_version(env.jsonrpc), request_id)
    if has_id and request_id is None and not (env.id is None and env.method is msgspec.UNSET):
        return Malformed(InvalidRequestError(f'"id" must be a string or an integer, not {_json_type(env.id)}'), None)
    if env.method is not msgspec.UNSET:
        return _classify_call(env, request_id, has_id)
    if env.result is msgspec.UNSET and env.error is msgspec.UNSET:
        missing = '"method" is missing: a request or notification names the method to call'
        return Malformed(InvalidRequestError(missing, missing="method"), request_id)
    if env.result is not msgspec.UNSET and env.error is not msgspec.UNSET:
        both = 'a response carries one of "result" and "error", not both'
        return Malformed(InvalidRequestError(both), request_id)
    if not has_id:
        return Malformed(InvalidRequestError('a response needs an "id"', missing="id"), None)
    error = None
    if env.error is not msgspec.UNSET:
        loose = _any_decoder.decode(env.error)
        error = loose if isinstance(loose, dict) else {"message": str(loose)}
    return IncomingResponse(request_id, env.result, error)


def _classify_call(env: RawEnvelope, request_id: RequestId | None, has_id: bool) -> Item:
    if not isinstance(env.method, str):
        return Malformed(InvalidRequestError(f'"method" must be a string, not {_json_type(env.method)}'), request_id)
    if env.result is not msgspec.UNSET or env.error is not msgspec.UNSET:
        extra = "result" if env.result is not msgspec.UNSET else "error"
        return Malformed(InvalidRequestError(f'a request (it has "method") carries no "{extra}"'), request_id)
    if env.params is not msgspec.UNSET and bytes(env.params).lstrip()[:1] not in (b"{", b"["):
        return Malformed(InvalidRequestError('"params" must be an object (named parameters)'), request_id)
    return IncomingCall(env.method, env.params, request_id, notification=not has_id)


def compact_json(text: bytes) -> bytes:
    """`text` (JSON from an untrusted source other than a frame, such as a guest) as compact JSON
    fit for a frame, or ParseError: what is not UTF-8 or nests too deeply never reaches the wire."""
    if not text.isascii():
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"not UTF-8 at byte {exc.start}") from None
    try:
        return msgspec.json.format(text, indent=-1)
    except msgspec.DecodeError as exc:
        raise ParseError(str(exc)) from None
    except RecursionError:
        raise ParseError("nested too deeply to decode") from None


def decode_params(decoder: msgspec.json.Decoder, params: msgspec.Raw | msgspec.UnsetType) -> Any:
    """Stage 4: params into the method's type; -32602 names the bad field's path."""
    raw = b"{}" if params is msgspec.UNSET else params
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:
        # Every params type is an object, so an array fails here: it is looked for only then, off
        # the path of a valid request (a copy and a strip, ~0.12 µs on every vm.call).
        if bytes(raw).lstrip()[:1] == b"[":
            raise InvalidParamsError("params must be an object (named parameters)", path="$") from None
        if not isinstance(exc, msgspec.ValidationError):  # text the envelope stage skipped unchecked
            raise ParseError(f"invalid JSON in params: {exc}") from None
        message = str(exc)
        found = _PATH_IN_MESSAGE.search(message)
        path = found.group("path") if found else "$"
        reason = message[: found.start()] if found else message
        raise InvalidParamsError(f"invalid params: {reason}", path=path) from None
    except RecursionError:  # the envelope stage passed it a few frames higher up the stack
        raise InvalidParamsError("params nested too deeply to decode", path="$") from None
