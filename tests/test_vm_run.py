"""vm.run with a real program: the CPython 3.11 WASI build, over both transports.

The module (20 MB) is fetched on first use (`tests.assets.cpython`) and compiled once per test
session into the session's compile cache by the `cpython` fixture (`tests/conftest.py`), so each
sidecar here loads it in milliseconds; the one slow compile is not charged to any test's `WAIT`.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import anyio
import pytest

from protocol.client import RemoteError, SidecarClient

from .guests import (
    refused,
    rpc,
    vm_info,
)
from .support import WAIT

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
async def python_vm(client: SidecarClient, cpython: Path, **params: Any) -> str:
    wasi = {"args": ["python"], **params.pop("wasi", {})}
    return (await rpc(client, "vm.create", {"path": str(cpython), "wasi": wasi, **params}))["vm_id"]


async def run(client: SidecarClient, vm_id: str, code: str, **params: Any) -> dict[str, Any]:
    return await rpc(client, "vm.run", {"vm_id": vm_id, "args": ["-c", code], **params})


async def test_print_one_plus_one(session, cpython) -> None:
    async with session() as (client, _):
        loaded = await rpc(client, "module.load", {"path": str(cpython)})
        assert loaded["cached"] is True  # the fixture compiled it into this session's cache
        assert {"name": "_start", "kind": "func", "params": [], "results": []} in loaded["exports"]
        assert all(item["module"] == "wasi_snapshot_preview1" for item in loaded["imports"])
        vm_id = await python_vm(client, cpython)
        for _ in range(2):  # each run is a fresh instance of the same VM
            result = await run(client, vm_id, "print(1+1)")
            assert result["exit_code"] == 0 and result["stdout"] == "2\n" and result["stderr"] == ""
            assert result["stdout_truncated"] is False and result["stderr_truncated"] is False
            assert result["elapsed_ms"] > 0
        assert (await vm_info(client, vm_id))["instances"] == 0  # a command VM keeps none between runs


async def test_exceptions_and_exit_codes(session, cpython) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client, cpython)
        failed = await run(client, vm_id, "1/0")
        assert failed["exit_code"] == 1 and failed["stdout"] == ""
        assert failed["stderr"].startswith("Traceback (most recent call last):")
        assert "ZeroDivisionError: division by zero" in failed["stderr"]
        assert (await run(client, vm_id, "import sys; sys.exit(3)"))["exit_code"] == 3
        assert (await run(client, vm_id, "raise SystemExit(0)"))["exit_code"] == 0
        message = await run(client, vm_id, "import sys; sys.exit('bye')")
        assert message["exit_code"] == 1 and message["stderr"] == "bye\n"
        assert (await run(client, vm_id, "print(6*7)"))["stdout"] == "42\n"


async def test_stdin_args_and_env(session, cpython) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client, cpython, wasi={"env": {"A": "vm", "B": "vm"}})
        text = await run(client, vm_id, "import sys; print(sys.stdin.read().upper())", stdin="héllo\nworld")
        assert text["stdout"] == "HÉLLO\nWORLD\n"
        raw = await run(
            client,
            vm_id,
            "import sys; print(list(sys.stdin.buffer.read()))",
            stdin_base64=base64.b64encode(b"\x00\xff\x10").decode(),
        )
        assert raw["stdout"] == "[0, 255, 16]\n"
        assert (await run(client, vm_id, "import sys; print(repr(sys.stdin.read()))"))["stdout"] == "''\n"
        argv = await rpc(client, "vm.run", {"vm_id": vm_id, "args": ["-c", "import sys; print(sys.argv)", "x", "y z"]})
        assert argv["stdout"] == "['-c', 'x', 'y z']\n"
        env = await run(
            client,
            vm_id,
            "import os; print(os.environ['A'], os.environ['B'], os.environ.get('C'))",
            env={"B": "run", "C": "run"},
        )
        assert env["stdout"] == "vm run run\n"
        assert (await run(client, vm_id, "import os; print(os.environ['B'])"))["stdout"] == "vm\n"


async def test_stdin_over_vm_input_bytes_is_refused(session, cpython) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client, cpython, limits={"vm_input_bytes": 100})
        params = {"vm_id": vm_id, "args": ["-c", "pass"], "stdin": "s" * 101}
        error = await refused(client, "vm.run", params, code=-32002)
        assert error.data["limit"] == "vm_input_bytes" and error.data["capacity"] == 100


async def test_output_past_vm_output_bytes_is_truncated_and_flagged(session, cpython) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client, cpython, limits={"vm_output_bytes": 1000})
        out = await run(client, vm_id, "print('a' * 5000)")
        assert out["exit_code"] == 0 and out["stdout"] == "a" * 1000
        assert out["stdout_truncated"] is True and out["stderr_truncated"] is False
        err = await run(client, vm_id, "import sys; sys.stderr.write('e' * 3000); print('ok')")
        assert err["stderr"] == "e" * 1000 and err["stderr_truncated"] is True
        assert err["stdout"] == "ok\n" and err["stdout_truncated"] is False
        exact = await run(client, vm_id, "import sys; sys.stdout.write('b' * 1000)")
        assert exact["stdout"] == "b" * 1000 and exact["stdout_truncated"] is False


async def test_output_that_is_not_utf8_comes_back_as_base64(session, cpython) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client, cpython)
        result = await run(client, vm_id, "import sys; sys.stdout.buffer.write(b'\\xff\\xfe ok')")
        assert "stdout" not in result
        assert base64.b64decode(result["stdout_base64"]) == b"\xff\xfe ok"
        assert result["stderr"] == ""


async def test_a_runaway_program_is_bounded_and_the_vm_runs_the_next_one(session, cpython) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client, cpython)
        params = {"vm_id": vm_id, "args": ["-c", "while True: pass"], "timeout_ms": 300}
        error = await refused(client, "vm.run", params, code=-32004)
        assert error.data["limit"] == "vm_call_timeout_ms" and error.data["capacity"] == 300
        assert (await run(client, vm_id, "print('next')"))["stdout"] == "next\n"


async def test_cancel_stops_a_running_program(session, cpython) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client, cpython)
        request_id, result = await client.start_request("vm.run", {"vm_id": vm_id, "args": ["-c", "while True: pass"]})
        with anyio.fail_after(WAIT):
            while (await vm_info(client, vm_id))["state"] != "busy":
                pass
        await client.cancel(request_id)
        with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
            await result()
        assert caught.value.code == -32800
        assert (await run(client, vm_id, "print('after')"))["stdout"] == "after\n"


@pytest.mark.parametrize(("limits", "size"), [(None, "10**9"), ({"vm_memory_bytes": "64 MiB"}, "100 * 2**20")])
async def test_a_memory_bomb_fails_inside_the_guest(session, cpython, limits, size) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client, cpython, **({"limits": limits} if limits else {}))
        bomb = await run(client, vm_id, f"x = bytearray({size})")
        assert bomb["exit_code"] == 1 and "MemoryError" in bomb["stderr"]
        assert (await run(client, vm_id, "x = bytearray(10**6); print(len(x))"))["stdout"] == "1000000\n"
        assert await rpc(client, "ping") == {}


async def test_a_preopened_directory_and_nothing_else(session, cpython, tmp_path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    (tmp_path / "ro" / "data.txt").write_text("from the host\n")
    preopens = [
        {"host_path": str(tmp_path / "ro"), "guest_path": "/data"},
        {"host_path": str(tmp_path / "rw"), "guest_path": "/out", "writable": True},
    ]
    async with session() as (client, _):
        vm_id = await python_vm(client, cpython, wasi={"preopens": preopens})
        read = await run(client, vm_id, "print(open('/data/data.txt').read(), end='')")
        assert read["exit_code"] == 0 and read["stdout"] == "from the host\n"
        assert (await run(client, vm_id, "import os; print(os.listdir('/data'))"))["stdout"] == "['data.txt']\n"
        refused_write = await run(client, vm_id, "open('/data/new.txt', 'w').write('x')")
        assert refused_write["exit_code"] == 1 and "Error" in refused_write["stderr"]
        assert not (tmp_path / "ro" / "new.txt").exists()
        wrote = await run(client, vm_id, "open('/out/result.txt', 'w').write('written by the guest')")
        assert wrote["exit_code"] == 0
        assert (tmp_path / "rw" / "result.txt").read_text() == "written by the guest"
        for path in ("/etc/passwd", str(tmp_path / "ro" / "data.txt"), "/data/../../etc/passwd"):
            escaped = await run(client, vm_id, f"open({path!r}).read()")
            assert escaped["exit_code"] == 1, path


async def test_a_preopen_that_is_not_a_directory_is_invalid_params(session, cpython, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    async with session() as (client, _):
        for host_path in (str(tmp_path / "missing"), str(tmp_path / "file")):
            params = {"path": str(cpython), "wasi": {"preopens": [{"host_path": host_path, "guest_path": "/d"}]}}
            error = await refused(client, "vm.create", params, code=-32602)
            assert error.data["path"] == "$.wasi.preopens[0].host_path"


async def test_stream_delivers_output_as_notifications_before_the_answer(session, cpython) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client, cpython)
        code = "import sys; print('out-1'); sys.stderr.write('err-1\\n'); print('out-2')"
        request_id, result = await client.start_request(
            "vm.run", {"vm_id": vm_id, "args": ["-c", code], "stream": True}
        )
        with anyio.fail_after(WAIT):
            answer = await result()
        assert answer["exit_code"] == 0 and answer["stdout"] == "" and answer["stderr"] == ""
        chunks: dict[str, str] = {"stdout": "", "stderr": ""}
        while client.notifications.statistics().current_buffer_used:  # all arrived before the answer
            note = client.notifications.receive_nowait()
            assert note["method"] == "vm.output"
            params = note["params"]
            assert params["vm_id"] == vm_id and params["request_id"] == request_id
            chunks[params["stream"]] += params["data"]
        assert chunks == {"stdout": "out-1\nout-2\n", "stderr": "err-1\n"}
        quiet = await run(client, vm_id, "print('kept')")
        assert quiet["stdout"] == "kept\n"
        assert client.notifications.statistics().current_buffer_used == 0


async def test_two_programs_run_at_once_on_two_vms(session, cpython) -> None:
    async with session() as (client, _):
        vms = [await python_vm(client, cpython) for _ in range(2)]
        pending = [
            await client.start_request("vm.run", {"vm_id": vm_id, "args": ["-c", f"print(sum(range({n})))"]})
            for n, vm_id in zip((10**6, 10**5), vms, strict=True)
        ]
        with anyio.fail_after(WAIT):
            outputs = [(await result())["stdout"] for _, result in pending]
        assert outputs == [f"{sum(range(10**6))}\n", f"{sum(range(10**5))}\n"]
