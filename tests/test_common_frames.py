"""The common frame's short path: it must decode, count and answer exactly as the staged path does.

A single request (`decode_frame` decodes it in one step), `ping`'s pre-encoded answer, and the
lock-free count of served requests, which `sidecar.stats` reports.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.decoding import IncomingCall, Malformed, decode_frame
from protocol.envelope import Response, encode
from sidecar.dispatcher import Dispatcher
from sidecar.limits import load_limits

from .support import WAIT
from .test_process import spawn

MEMBER_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)  # fmt: skip


@st.composite
def messages(draw: Any) -> bytes:
    """Plain requests and their near misses: up to two members dropped, retyped or added."""
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": draw(st.integers() | st.text(max_size=8)),
                               "method": draw(st.sampled_from(["ping", "vm.call", "x"]))}
    if draw(st.booleans()):
        message["params"] = {"a": [1]}
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        key = draw(st.sampled_from(["jsonrpc", "id", "method", "params", "result", "error", "extra"]))
        if key in message and draw(st.booleans()):
            del message[key]
        else:
            message[key] = draw(MEMBER_VALUES)
    separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    return json.dumps(message, separators=separators).encode()


def verdict(item: object) -> tuple:
    if isinstance(item, Malformed):
        return "malformed", item.error.code, item.error.message, item.id
    if isinstance(item, IncomingCall):
        params = item.params if item.params is msgspec.UNSET else bytes(item.params)
        return "call", item.method, params, item.id, item.notification
    return "other", type(item).__name__


@settings(max_examples=400)
@given(messages())
def test_a_single_message_decodes_as_inside_a_batch(line: bytes) -> None:
    """A batch's members always take the staged path; a lone message may take the one-step one."""
    alone = decode_frame(line)
    batched = decode_frame(b"[" + line + b"]")
    assert not alone.batch and batched.batch
    assert verdict(alone.items[0]) == verdict(batched.items[0])


def test_plain_request_takes_every_member() -> None:
    item = decode_frame(b'{"jsonrpc":"2.0","id":"r.1","method":"vm.call","params":{"vm_id":"v"}}').items[0]
    assert isinstance(item, IncomingCall)
    assert (item.method, bytes(item.params), item.id, item.notification) == ("vm.call", b'{"vm_id":"v"}', "r.1", False)


IDS = [0, 1, -7, 2**53, 2**64, 2**70, "s", 'q"\\\u00e9']


def test_ping_answers_are_byte_for_byte_the_encoded_response() -> None:
    frames = b"".join(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "ping"}).encode() + b"\n"
                      for request_id in IDS)
    with spawn() as proc:
        proc.stdin.write(frames)
        proc.stdin.close()
        out = proc.stdout.read()
        assert proc.wait(WAIT) == 0
    assert out.splitlines(keepends=True) == [encode(Response(id=request_id, result={})) for request_id in IDS]


def test_requests_served_counts_every_ping_and_reading_it_changes_nothing() -> None:
    pings = 3000
    stats = b'{"jsonrpc":"2.0","id":"stats.%d","method":"sidecar.stats"}\n'
    ping_frames = b"".join(b'{"jsonrpc":"2.0","id":%d,"method":"ping"}\n' % index for index in range(pings))
    with spawn() as proc:
        proc.stdin.write(ping_frames + stats % 1 + stats % 2 + stats % 3)
        proc.stdin.close()
        answers = [json.loads(line) for line in proc.stdout.read().splitlines()]
        assert proc.wait(WAIT) == 0
    served = [answer["result"]["requests_served"] for answer in answers[pings:]]
    assert served == [pings, pings + 1, pings + 2]  # a stats request is counted once it is answered


@pytest.fixture
def fine_thread_switching() -> Any:
    """Threads switch every microsecond, so a count that could lose an update would."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def test_requests_served_is_exact_under_concurrent_threads(fine_thread_switching: None) -> None:
    threads, per_thread = 4, 5000
    frames = Dispatcher(load_limits({}), lambda frame: None, lambda *a, **k: False)
    frames.route("ping", "inline", lambda params: None)
    frames.route("vm.list", "deferred", lambda params, reply: reply.result(None))  # counted on completion
    readings: list[list[int]] = []
    serving = threading.Barrier(threads + 1)
    done = threading.Event()

    def serve(worker: int) -> None:
        serving.wait(WAIT)
        for index in range(per_thread):
            method = "ping" if index % 2 else "vm.list"
            frames.handle_line(b'{"jsonrpc":"2.0","id":"%d.%d","method":"%s"}' % (worker, index, method.encode()))

    def read() -> None:
        seen = []
        serving.wait(WAIT)
        while not done.is_set():
            seen.append(frames.requests_served)
        readings.append(seen)

    workers = [threading.Thread(target=serve, args=(worker,)) for worker in range(threads)]
    reader = threading.Thread(target=read)
    for thread in [*workers, reader]:
        thread.start()
    for thread in workers:
        thread.join(WAIT)
    done.set()
    reader.join(WAIT)
    assert frames.requests_served == threads * per_thread
    (seen,) = readings
    assert seen and seen == sorted(seen) and seen[-1] <= threads * per_thread
