"""The cold start (issue 15): the session answers before wasmtime and the VM services are imported,
and before structlog, asyncio and anyio are.

A package placed first on the sidecar's `PYTHONPATH` stands in for the real one: a `wasmtime` that
fails to import shows that `initialize` and `ping` need nothing that imports wasmtime and that a
failed load is an error naming what failed (never a hang, never a dead daemon); one that holds its
import until the test opens a gate shows that a request needing the services waits for them. Gated
`structlog`, `anyio` and `asyncio` (the event loop's libraries) show that the first answers need
none of them (nor does the MCP front's), that the log events of that time are written once
they load, as they happened, and that a session ending before the loop runs (a signal, end of input) ends cleanly.
"""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest

from .mcp_support import initialize as mcp_initialize
from .support import WAIT
from .test_process import Lines, events, spawn

INITIALIZE = b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocol_version":1}}\n'
BROKEN = "this wasmtime is broken on purpose"
VM_CREATE = b'{"jsonrpc":"2.0","id":%d,"method":"vm.create","params":{"wat":"(module (func (export \\"f\\")))"}}\n'
GATED = """\
import os, sys

_gate = os.open(os.environ["TEST_GATE"], os.O_RDONLY)  # the test writes a byte per stand-in to open it
os.read(_gate, 1)  # exactly one: a buffered read could take the bytes of the others
os.close(_gate)
_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _here]
del sys.modules["%(name)s"]
import %(name)s as _real  # the real package; importlib returns what sys.modules holds when done

sys.modules["%(name)s"] = _real
"""


def stand_in(root: Path, source: str, name: str = "wasmtime") -> dict[str, str]:
    """An environment whose `import <name>` runs `source` first (even a standard library module's:
    `PYTHONPATH` comes before the standard library on `sys.path`)."""
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(source)
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path}


def gated(root: Path, *names: str) -> tuple[dict[str, str], int]:
    """An environment whose `import <name>`, for each of `names`, waits for a byte written to the
    returned fd (write one per name)."""
    gate = root / "gate"
    os.mkfifo(gate)
    gate_fd = os.open(gate, os.O_RDWR)  # a writer from the start: the sidecar's open never blocks
    env = {"TEST_GATE": str(gate)}
    for name in names:
        env.update(stand_in(root, GATED % {"name": name}, name))
    return env, gate_fd


def send(proc, frame: bytes) -> None:
    proc.stdin.write(frame)
    proc.stdin.flush()


def end(proc) -> list[dict]:
    """End of input: the sidecar exits 0; its log events."""
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0
    logged = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return events(logged)


def normal_initialize() -> dict:
    proc = spawn()
    send(proc, INITIALIZE)
    answer = Lines(proc).next()
    end(proc)
    return answer


def test_initialize_and_ping_need_no_wasmtime_and_a_failed_load_is_named(tmp_path) -> None:
    proc = spawn(env=stand_in(tmp_path, f"raise ImportError({BROKEN!r})\n"))
    lines = Lines(proc)
    send(proc, INITIALIZE)
    assert lines.next() == normal_initialize()  # the whole answer, capabilities and limits as ever
    send(proc, VM_CREATE % 2 + b'{"jsonrpc":"2.0","id":3,"method":"vm.list"}\n')
    for request_id in (2, 3):  # the first request that needs the services, and every one after
        error = lines.next()
        assert error["id"] == request_id
        assert error["error"]["code"] == -32603
        assert BROKEN in error["error"]["message"]
        assert error["error"]["data"] == {"kind": "internal", "failed": f"ImportError: {BROKEN}"}
    send(proc, b'{"jsonrpc":"2.0","id":4,"method":"ping"}\n{"jsonrpc":"2.0","id":5,"method":"sidecar.stats"}\n')
    assert lines.next() == {"jsonrpc": "2.0", "id": 4, "result": {}}
    stats = lines.next()
    assert stats["id"] == 5 and stats["result"]["vms"] == 0
    logged = [event for event in end(proc) if event["event"] == "services_failed"]
    assert [event["error"] for event in logged] == [f"ImportError: {BROKEN}"]


def test_a_request_needing_the_services_waits_for_them(tmp_path) -> None:
    env, gate_fd = gated(tmp_path, "wasmtime")
    try:
        proc = spawn(env=env)
        lines = Lines(proc)
        send(proc, INITIALIZE + VM_CREATE % 2 + b'{"jsonrpc":"2.0","id":3,"method":"ping"}\n')
        assert lines.next()["id"] == 1  # while wasmtime's import cannot have finished
        os.write(gate_fd, b"x")
        answers = {answer["id"]: answer for answer in (lines.next(), lines.next())}
        assert answers[2]["result"]["vm_id"]  # a result, not an error: it waited for the services
        assert answers[3]["result"] == {}
    finally:
        os.close(gate_fd)
    assert not [event for event in end(proc) if event["event"] == "services_failed"]


@pytest.mark.parametrize("method", ["tools/list", "tools/call"])
def test_the_mcp_front_answers_initialize_without_wasmtime_and_names_a_failed_load(tmp_path, method) -> None:
    proc = spawn("mcp", env=stand_in(tmp_path, f"raise ImportError({BROKEN!r})\n"))
    lines = Lines(proc)
    send(proc, json.dumps(mcp_initialize()).encode() + b"\n")
    assert lines.next()["result"]["serverInfo"]["name"] == "wasm-sidecar"
    params = {"name": "list_sessions", "arguments": {}} if method == "tools/call" else {}
    send(proc, json.dumps({"jsonrpc": "2.0", "id": 2, "method": method, "params": params}).encode() + b"\n")
    error = lines.next()["error"]
    assert error["code"] == -32603 and error["data"]["failed"] == f"ImportError: {BROKEN}"
    assert [event["event"] for event in end(proc)].count("services_failed") == 1


LOOP_AND_LOGS = ("structlog", "anyio", "asyncio")  # what the first answers must not wait for


def test_the_first_answers_need_no_event_loop_nor_structlog_and_their_log_events_follow(tmp_path) -> None:
    env, gate_fd = gated(tmp_path, *LOOP_AND_LOGS)
    try:
        proc = spawn(env=env)
        lines = Lines(proc)
        hello = b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"client":{"name":"cold","version":"9"}}}\n'
        send(proc, hello + b'{"jsonrpc":"2.0","id":2,"method":"ping"}\n' + VM_CREATE % 3)
        assert lines.next()["result"]["server"]["name"] == "wasm-sidecar"  # while none of them can load
        assert lines.next() == {"jsonrpc": "2.0", "id": 2, "result": {}}
        opened = datetime.now(UTC)
        os.write(gate_fd, b"x" * len(LOOP_AND_LOGS))
        assert lines.next()["result"]["vm_id"]  # the services came after it, as ever
    finally:
        os.close(gate_fd)
    logged = end(proc)
    held = {event["event"]: event for event in logged[:2]}
    assert held["sidecar_started"]["front"] == "jsonrpc" and held["sidecar_started"]["level"] == "info"
    assert held["host_identified"] == {"event": "host_identified", "client": "cold", "client_version": "9",
                                       "level": "info", "timestamp": held["host_identified"]["timestamp"]}
    for event in held.values():  # stamped when they happened, not when structlog came to write them
        assert datetime.fromisoformat(event["timestamp"]) < opened
    assert logged[-1]["event"] == "sidecar_stopped" and logged[-1]["reason"] == "end_of_input"


def test_the_mcp_front_answers_initialize_before_the_event_loop_too(tmp_path) -> None:
    env, gate_fd = gated(tmp_path, *LOOP_AND_LOGS)
    try:
        proc = spawn("mcp", env=env)
        send(proc, json.dumps(mcp_initialize()).encode() + b"\n")
        assert Lines(proc).next()["result"]["serverInfo"]["name"] == "wasm-sidecar"  # while none can load
        os.write(gate_fd, b"x" * len(LOOP_AND_LOGS))
        logged = end(proc)
    finally:
        os.close(gate_fd)
    assert [event["event"] for event in logged[:2]] == ["sidecar_started", "host_identified"]
    assert logged[0]["front"] == "mcp"


@pytest.mark.parametrize("ending", ["signal", "end_of_input"])
def test_a_session_that_ends_before_the_event_loop_runs_ends_cleanly(tmp_path, ending) -> None:
    env, gate_fd = gated(tmp_path, *LOOP_AND_LOGS)
    try:
        proc = spawn(env=env)
        send(proc, INITIALIZE)
        assert Lines(proc).next()["id"] == 1  # serving, before the loop (and its signal handling) exist
        if ending == "signal":
            proc.send_signal(signal.SIGTERM)
        else:
            proc.stdin.close()
        os.write(gate_fd, b"x" * len(LOOP_AND_LOGS))
        assert proc.wait(timeout=WAIT) == 0
    finally:
        os.close(gate_fd)  # once nobody may still open the gate: a fifo without a writer drops its byte
    logged = events(proc.stderr.read())
    proc.stdout.close()
    proc.stderr.close()
    if ending == "signal":
        assert [event["signal"] for event in logged if event["event"] == "signal_received"] == ["SIGTERM"]
        proc.stdin.close()
    assert [event["reason"] for event in logged if event["event"] == "sidecar_stopped"] == [ending]
