"""Frames no decoder should die of, sent to the real process: each gets one answer and the next is served.

Regression tests for frames that once ended the daemon (nesting deep enough to exhaust the
decoder's recursion) or answered -32603 with a traceback in the log (bytes that are not UTF-8
inside `params`), and for -32600 messages that must tell a host author what to fix.
"""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from protocol.errors import ErrorCode
from sidecar import dispatcher
from sidecar.dispatcher import Dispatcher
from sidecar.limits import load_limits

from .test_process import PING, Lines, events, spawn

DEPTH = 100_000  # far past any recursion limit; the frame stays well under protocol_frame_bytes


def exchange(frames: list[bytes]) -> tuple[list[dict], list[dict]]:
    """Send `frames` pipelined, then a ping; the answers up to the ping's, and the log events."""
    with spawn() as proc:
        proc.stdin.write(b"".join(frame + b"\n" for frame in frames) + PING)
        proc.stdin.flush()
        lines = Lines(proc)
        answers = []
        while (answer := lines.next()).get("id") != 1:
            answers.append(answer)
        assert answer["result"] == {}  # the sidecar is still serving
        proc.stdin.close()
        assert proc.wait(10) == 0
        return answers, events(proc.stderr.read())


def no_errors_logged(logged: list[dict]) -> None:
    assert [event for event in logged if event.get("level") == "error"] == []


NESTED = [
    pytest.param(b"[" * DEPTH, None, id="bare-arrays"),
    pytest.param(b'{"a":' * DEPTH, None, id="bare-objects"),
    pytest.param(b'{"jsonrpc":"2.0","id":"deep","method":"ping","params":{"a":' + b"[" * DEPTH + b"]" * DEPTH + b"}}",
                 "deep", id="in-params"),
    pytest.param(b'{"jsonrpc":"2.0","id":41,"method":"vm.call","params":' + b'{"a":' * DEPTH + b"1" + b"}" * DEPTH
                 + b"}", 41, id="params-object"),
    pytest.param(b'[{"jsonrpc":"2.0","id":5,"method":"ping","params":' + b"[" * DEPTH + b"]" * DEPTH + b"}]",
                 None, id="inside-a-batch"),
    pytest.param(b'{"jsonrpc":"2.0","id":"late","result":' + b"[" * DEPTH + b"]" * DEPTH + b"}", "late",
                 id="a-response"),
]  # fmt: skip


@pytest.mark.parametrize(("frame", "request_id"), NESTED)
def test_deep_nesting_gets_one_answer_and_the_daemon_serves_on(frame: bytes, request_id: object) -> None:
    answers, logged = exchange([frame])
    assert len(answers) == 1
    error = answers[0]["error"]
    assert error["code"] == ErrorCode.INVALID_REQUEST
    assert error["data"] == {"kind": "invalid_request", "reason": "nesting"}
    assert answers[0]["id"] == request_id
    no_errors_logged(logged)


NOT_UTF8 = [
    pytest.param(b'{"jsonrpc":"2.0","id":1001,"method":"ping","params":{"k\xff":1}}', 1001, id="in-a-key"),
    pytest.param(b'{"jsonrpc":"2.0","id":1002,"method":"ping","params":{"k":"v\xc0\xaf"}}', 1002, id="overlong"),
    pytest.param(b'{"jsonrpc":"2.0","id":1003,"method":"ping","params":{"k":"\xed\xa0\x80"}}', 1003,
                 id="encoded-surrogate"),
    pytest.param(b'{"jsonrpc":"2.0","id":1004,"method":"ping","params":{"k":"\xe2\x82"}}', 1004, id="truncated"),
    pytest.param(b'{"jsonrpc":"2.0","id":"x\xff","method":"ping"}', None, id="in-the-id"),
    pytest.param(b'{"jsonrpc":"2.0","id":1005,"method":"pi\xffng"}', 1005, id="in-the-method"),
    pytest.param(b'{"jsonrpc":"2.0","id":"r.1","result":"\xff"}', "r.1", id="in-a-response"),
]  # fmt: skip


@pytest.mark.parametrize(("frame", "request_id"), NOT_UTF8)
def test_bytes_that_are_not_utf8_are_not_json_text(frame: bytes, request_id: object) -> None:
    answers, logged = exchange([frame])
    assert len(answers) == 1
    assert answers[0]["id"] == request_id
    error = answers[0]["error"]
    assert error["code"] == ErrorCode.PARSE_ERROR
    with pytest.raises(UnicodeDecodeError) as bad:
        frame.decode("utf-8")
    assert error["data"] == {"kind": "parse_error", "offset": bad.value.start}
    no_errors_logged(logged)


def test_an_escaped_lone_surrogate_in_params_is_a_parse_error() -> None:
    answers, logged = exchange([rb'{"jsonrpc":"2.0","id":9,"method":"ping","params":{"k":"\ud800"}}'])
    assert [(a["id"], a["error"]["code"]) for a in answers] == [(9, ErrorCode.PARSE_ERROR)]
    no_errors_logged(logged)


@pytest.mark.parametrize("params", [b"[]", b" [2, 40]", b'[{"vm_id":"vm-x"}]'])
def test_params_given_by_position_are_refused_with_what_to_fix(params: bytes) -> None:
    """Looked for only once decoding failed (off a valid request's path): still said for every array."""
    frame = b'{"jsonrpc":"2.0","id":8,"method":"vm.call","params":%s}' % params
    answers, logged = exchange([frame])
    assert [(a["id"], a["error"]["code"], a["error"]["data"]["path"]) for a in answers] == \
        [(8, ErrorCode.INVALID_PARAMS, "$")]
    assert "params must be an object (named parameters)" in answers[0]["error"]["message"]
    no_errors_logged(logged)


@pytest.mark.parametrize(
    ("frame", "says", "request_id"),
    [
        (b'{"jsonrpc":"2.0","id":7}', '"method" is missing', 7),
        (b'{"jsonrpc":"2.0","id":7,"result":1,"error":{}}', "not both", 7),
        (b'{"id":7,"method":"ping"}', '"jsonrpc": "2.0" is missing', 7),
        (b'{"jsonrpc":2.0,"id":7,"method":"ping"}', '"jsonrpc" must be the string "2.0", not 2.0', 7),
        (b'{"jsonrpc":"2.0","id":7,"method":5}', '"method" must be a string, not a number', 7),
        (b'{"jsonrpc":"2.0","id":7,"method":"ping","result":1}', 'carries no "result"', 7),
        (b'{"jsonrpc":"2.0","id":7,"method":"ping","extra":1}', 'unknown member "extra"', 7),
        (b'{"jsonrpc":"2.0","id":7,"method":"ping","params":"x"}', '"params" must be an object', 7),
        (b'{"jsonrpc":"2.0","id":[7],"method":"ping"}', '"id" must be a string or an integer, not an array', None),
        (b"7", "a JSON-RPC 2.0 message is an object", None),
    ],
)
def test_invalid_requests_say_what_to_fix(frame: bytes, says: str, request_id: object) -> None:
    answers, logged = exchange([frame])
    assert len(answers) == 1
    assert answers[0]["id"] == request_id
    error = answers[0]["error"]
    assert error["code"] == ErrorCode.INVALID_REQUEST
    assert says in error["message"], error["message"]
    no_errors_logged(logged)


def test_whatever_escapes_handling_a_frame_answers_it_and_serving_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[bytes] = []
    frames = Dispatcher(load_limits({}), sent.append, lambda *a, **k: True)
    frames.route("ping", "inline", lambda params: {})
    decode = dispatcher.decode_frame

    def buggy(line: bytes) -> object:
        if b"boom" in line:
            raise RuntimeError("a bug in handling")
        return decode(line)

    monkeypatch.setattr(dispatcher, "decode_frame", buggy)
    with capture_logs() as logged:
        frames.handle_line(b'{"jsonrpc":"2.0","id":"boom.1","method":"ping"}')
        assert frames.handle_if_cheap(b'{"jsonrpc":"2.0","id":"boom.2","method":"ping"}')
        frames.handle_line(PING)
    answers = [json.loads(frame) for frame in sent]
    assert [(a["id"], a.get("error", {}).get("code")) for a in answers] == [
        ("boom.1", ErrorCode.INTERNAL_ERROR), ("boom.2", ErrorCode.INTERNAL_ERROR), (1, None)
    ]
    assert "Traceback" not in json.dumps(answers)
    assert [event["event"] for event in logged if event["log_level"] == "error"] == ["frame_failed"] * 2
