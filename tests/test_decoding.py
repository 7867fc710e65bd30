"""Staged decoding: each kind of bad frame gets the code the JSON-RPC 2.0 spec prescribes."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.decoding import IncomingCall, IncomingResponse, Malformed, decode_frame, decode_params, recover_id
from protocol.errors import ErrorCode, InvalidParamsError
from protocol.methods import params_decoder


def only(line: bytes):
    frame = decode_frame(line)
    assert not frame.batch and len(frame.items) == 1
    return frame.items[0]


def test_request_and_notification() -> None:
    call = only(b'{"jsonrpc":"2.0","id":"a","method":"ping"}')
    assert call == IncomingCall("ping", msgspec.UNSET, "a", notification=False)
    note = only(b'{"jsonrpc":"2.0","method":"ping","params":{}}')
    assert isinstance(note, IncomingCall) and note.notification and note.id is None


def test_response_with_result_and_with_error() -> None:
    ok = only(b'{"jsonrpc":"2.0","id":"x.1","result":[1,2]}')
    assert isinstance(ok, IncomingResponse) and bytes(ok.result) == b"[1,2]" and ok.error is None
    bad = only(b'{"jsonrpc":"2.0","id":"x.2","error":{"code":5,"message":"no"}}')
    assert isinstance(bad, IncomingResponse) and bad.error == {"code": 5, "message": "no"}


@pytest.mark.parametrize(
    ("line", "code", "request_id"),
    [
        # The JSON-RPC 2.0 specification's own examples.
        (b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]', ErrorCode.PARSE_ERROR, None),
        (b'{"jsonrpc": "2.0", "method": 1, "params": "bar"}', ErrorCode.INVALID_REQUEST, None),
        (b'[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},{"jsonrpc": "2.0", "method"]',
         ErrorCode.PARSE_ERROR, None),
        (b"[]", ErrorCode.INVALID_REQUEST, None),
        # Our own cases.
        (b"5", ErrorCode.INVALID_REQUEST, None),
        (b'"text"', ErrorCode.INVALID_REQUEST, None),
        (b"5 6", ErrorCode.PARSE_ERROR, None),
        (b'{"jsonrpc":"1.0","id":7,"method":"ping"}', ErrorCode.INVALID_REQUEST, 7),
        (b'{"id":7,"method":"ping"}', ErrorCode.INVALID_REQUEST, 7),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', ErrorCode.INVALID_REQUEST, None),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', ErrorCode.INVALID_REQUEST, None),
        (b'{"jsonrpc":"2.0","id":[1],"method":"ping"}', ErrorCode.INVALID_REQUEST, None),
        (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', ErrorCode.INVALID_REQUEST, None),
        (b'{"jsonrpc":"2.0","id":3,"method":"ping","params":"x"}', ErrorCode.INVALID_REQUEST, 3),
        (b'{"jsonrpc":"2.0","id":3,"method":"ping","extra":1}', ErrorCode.INVALID_REQUEST, 3),
        (b'{"jsonrpc":"2.0","id":3,"method":"ping","result":1}', ErrorCode.INVALID_REQUEST, 3),
        (b'{"jsonrpc":"2.0","id":3}', ErrorCode.INVALID_REQUEST, 3),
        (b'{"jsonrpc":"2.0","id":3,"result":1,"error":{}}', ErrorCode.INVALID_REQUEST, 3),
        (b'{"jsonrpc":"2.0","result":1}', ErrorCode.INVALID_REQUEST, None),
        (b"\xff\xfe", ErrorCode.PARSE_ERROR, None),
    ],
)  # fmt: skip
def test_malformed_frames(line: bytes, code: ErrorCode, request_id: object) -> None:
    item = only(line)
    assert isinstance(item, Malformed)
    assert item.error.code == code
    assert item.id == request_id


def test_batches_keep_per_item_verdicts() -> None:
    frame = decode_frame(b'[1, {"jsonrpc":"2.0","method":"ping","id":1}, {"jsonrpc":"2.0","method":"ping"}]')
    assert frame.batch
    first, second, third = frame.items
    assert isinstance(first, Malformed) and first.error.code == ErrorCode.INVALID_REQUEST
    assert isinstance(second, IncomingCall) and second.id == 1
    assert isinstance(third, IncomingCall) and third.notification


def test_spec_batch_of_three_numbers() -> None:
    frame = decode_frame(b"[1,2,3]")
    assert frame.batch and [i.error.code for i in frame.items] == [ErrorCode.INVALID_REQUEST] * 3


def test_params_errors_carry_the_path() -> None:
    decoder = params_decoder("vm.call")
    with pytest.raises(InvalidParamsError) as caught:
        decode_params(decoder, msgspec.Raw(b'{"vm_id":"v","export":"f","args":[1,"x"]}'))
    assert caught.value.data["path"] == "$.args[1]"
    with pytest.raises(InvalidParamsError) as caught:
        decode_params(decoder, msgspec.Raw(b'{"export":"f"}'))
    assert "vm_id" in caught.value.message and caught.value.data["path"] == "$"
    with pytest.raises(InvalidParamsError) as caught:
        decode_params(decoder, msgspec.Raw(b"[1,2]"))
    assert "named" in caught.value.message


def test_absent_params_read_as_empty_object() -> None:
    assert decode_params(params_decoder("ping"), msgspec.UNSET) is not None


@given(st.binary(max_size=200))
def test_any_bytes_decode_to_items_without_raising(line: bytes) -> None:
    frame = decode_frame(line)
    assert frame.items
    for item in frame.items:
        assert isinstance(item, IncomingCall | IncomingResponse | Malformed)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"jsonrpc":"2.0","id":12,"method":"x","params":' + b"[" * 5000, 12),
        (b'{"id" : "a\\"b", "params":{"id":3}}', 'a"b'),
        (b'{"params":{"id":3},"x":[{"id":4}],"id":-5}', -5),
        (b'{"params":{"id":3}}', None),  # only a top-level member counts
        (b'{"id":1.5}', None),
        (b'{"id":null}', None),
        (b'{"id":"a\xef\xbf\xbd"}', None),  # replaced bytes: not an id the host sent
        (b'[{"id":1}]', None),  # a batch has no single id
        (b'{"x":' + b"[1]," * 5000 + b'"id":2}', None),  # past the scan's budget
        (b"\"id\":3", None),
    ],
)
def test_recover_id_reads_only_what_is_certain(line: bytes, expected: object) -> None:
    assert recover_id(line) == expected


def test_nesting_past_the_decoders_reach_is_refused_not_raised() -> None:
    deep = only(b'{"jsonrpc":"2.0","id":"d","method":"ping","params":' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    assert isinstance(deep, Malformed) and deep.id == "d"
    assert deep.error.code == ErrorCode.INVALID_REQUEST and deep.error.data["reason"] == "nesting"
