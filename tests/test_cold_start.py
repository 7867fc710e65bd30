"""The cold start (issue 15): the session answers before wasmtime and the VM services are imported.

A `wasmtime` package placed first on the sidecar's `PYTHONPATH` stands in for the real one: one
that fails to import shows that `initialize` and `ping` need nothing that imports wasmtime and that
a failed load is an error naming what failed (never a hang, never a dead daemon); one that holds
its import until the test opens a gate shows that a request needing the services waits for them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .mcp_support import initialize as mcp_initialize
from .test_process import Lines, events, spawn

INITIALIZE = b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocol_version":1}}\n'
BROKEN = "this wasmtime is broken on purpose"
VM_CREATE = b'{"jsonrpc":"2.0","id":%d,"method":"vm.create","params":{"wat":"(module (func (export \\"f\\")))"}}\n'
GATED = """\
import os, sys

with open(os.environ["TEST_WASMTIME_GATE"], "rb") as gate:  # the test writes a byte to open it
    gate.read(1)
_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _here]
del sys.modules["wasmtime"]
import wasmtime as _real  # the real package; importlib returns what sys.modules holds when done

sys.modules["wasmtime"] = _real
"""


def stand_in(root: Path, source: str) -> dict[str, str]:
    """An environment whose `import wasmtime` runs `source` first."""
    (root / "wasmtime").mkdir()
    (root / "wasmtime" / "__init__.py").write_text(source)
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path}


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
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    gate_fd = os.open(gate, os.O_RDWR)  # a writer from the start: the sidecar's open never blocks
    try:
        proc = spawn(env={**stand_in(tmp_path, GATED), "TEST_WASMTIME_GATE": str(gate)})
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
