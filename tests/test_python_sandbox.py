"""Python sandboxes through the daemon: `vm.create {runtime: "python"}` and `vm.eval`, end to end.

Sessions keep their names; stateless evals see a pristine interpreter; exceptions and `SystemExit`
are results; host calls from Python; timeouts, memory bombs and output floods end only the eval
(a session says it was lost and goes on with a fresh interpreter); fresh interpreters never share
a random stream; a session snapshotted in one process goes on in another.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from protocol.client import HostError

from .guests import call, new_vm, refused, rpc, vm_info
from .snapshot_support import read_state, replace, write_state
from .support import WAIT, process_session

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("python_runtime")]


async def python_vm(client: Any, **params: Any) -> str:
    return (await rpc(client, "vm.create", {"runtime": "python", **params}))["vm_id"]


async def run(client: Any, vm_id: str, code: str, **params: Any) -> dict[str, Any]:
    """The eval's answer, less its time (checked here: a non-negative number of milliseconds)."""
    answer = await rpc(client, "vm.eval", {"vm_id": vm_id, "code": code, **params})
    elapsed = answer.pop("elapsed_ms")
    assert isinstance(elapsed, int | float) and elapsed >= 0
    return answer


async def test_initialize_lists_the_installed_runtime(session, python_runtime) -> None:
    async with session() as (client, _):
        [listed] = (await rpc(client, "initialize"))["capabilities"]["runtimes"]
    assert listed == {"name": "python", "version": python_runtime.version, "preimported": python_runtime.preimported}
    assert {"json", "re", "math", "datetime", "decimal", "statistics"} <= set(listed["preimported"])


async def test_a_session_keeps_names_imports_and_objects(session) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client)
        assert await run(client, vm_id, "print(1+1)") == {"status": "ok", "stdout": "2\n", "stderr": ""}
        await run(client, vm_id, "import fractions\nx = 41\nclass Box:\n    n = 1\nbox = Box()")
        answer = await run(client, vm_id, "box.n += x\nx + 1, fractions.Fraction(1, 3), box.n")
        assert answer["status"] == "ok" and answer["value"] == "(42, Fraction(1, 3), 42)"
        assert (await run(client, vm_id, "input() + input()", stdin="a\nb\n"))["value"] == "'ab'"


async def test_every_stateless_eval_sees_a_pristine_interpreter(session) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client, mode="stateless")
        await run(client, vm_id, "y = 5\nimport json\njson.marker = 1")
        left = await run(client, vm_id, "import json\n'y' in globals(), hasattr(json, 'marker')")
        assert left["value"] == "(False, False)"


async def test_a_stateless_python_vm_keeps_a_warmed_spare_within_its_pool(session) -> None:
    """The next request takes the spare while the last one's replacement is prepared; the spare is
    one of the pool's instances (`vm_pool_instances`), and a session has none."""
    async with session() as (client, _):
        stateless = await python_vm(client, mode="stateless")
        stateful = await python_vm(client)
        assert (await vm_info(client, stateless))["instances"] == 2
        assert (await vm_info(client, stateful))["instances"] == 1
        one = await python_vm(client, mode="stateless", limits={"vm_pool_instances": 1})
        assert (await vm_info(client, one))["instances"] == 1  # no room for a spare
        draws = [(await run(client, stateless, "import random\nrandom.random()"))["value"] for _ in range(4)]
        assert len(set(draws)) == 4  # spare or replacement, each a fresh interpreter of its own


async def test_exceptions_and_exits_are_results(session) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client)
        failed = await run(client, vm_id, "def f():\n    return 1/0\nprint('before')\nf()")
        assert failed["status"] == "error" and failed["stdout"] == "before\n"
        error = failed["error"]
        assert (error["type"], error["message"]) == ("ZeroDivisionError", "division by zero")
        assert re.search(r'File "<eval-\d+>", line 2, in f', error["traceback"]), error["traceback"]
        assert "_sidecar_driver" not in error["traceback"]
        syntax = (await run(client, vm_id, "def (:"))["error"]
        assert syntax["type"] == "SyntaxError"
        assert await run(client, vm_id, "raise SystemExit(3)") == {"status": "exit", "exit_code": 3, "stdout": "",
                                                                   "stderr": ""}
        assert (await run(client, vm_id, "exit()"))["exit_code"] == 0
        assert (await run(client, vm_id, "1 + 1"))["value"] == "2"  # the session lives on


async def test_python_calls_the_host(session) -> None:
    async def host(vm_id: str, method: str, params: Any) -> Any:
        if method == "fail":
            raise HostError(7, "no such key", {"key": params["key"]})
        return {"method": method, "params": params, "vm_id": vm_id}

    async with session(host_handler=host) as (client, _):
        vm_id = await python_vm(client)
        answer = await run(client, vm_id, "import sidecar\nsidecar.host_call('kv.get', {'key': 'k', 'n': [1, 2]})")
        assert answer["value"] == repr({"method": "kv.get", "params": {"key": "k", "n": [1, 2]}, "vm_id": vm_id})
        code = ("try:\n    sidecar.host_call('fail', {'key': 'k'})\n"
                "except sidecar.HostError as e:\n    r = (e.code, e.message, e.data)\nr")
        assert (await run(client, vm_id, code))["value"] == repr((7, "no such key", {"key": "k"}))


TIMEOUT_MS = 400


async def test_a_loop_times_out_and_a_session_goes_on_with_a_fresh_interpreter(session) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client)
        await run(client, vm_id, "kept = 1")
        started = time.monotonic()
        error = await refused(client, "vm.eval", {"vm_id": vm_id, "code": "while True: pass", "timeout_ms": TIMEOUT_MS},
                              code=-32004)
        assert TIMEOUT_MS <= (time.monotonic() - started) * 1000 <= 1.3 * TIMEOUT_MS
        assert error.data["limit"] == "vm_call_timeout_ms" and error.data["session"] == "lost"
        assert (await run(client, vm_id, "'kept' in globals()"))["value"] == "False"
        assert (await run(client, vm_id, "2 * 21"))["value"] == "42"


async def test_a_memory_bomb_is_a_memory_error_and_the_sidecar_serves_on(session) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client, limits={"vm_memory_bytes": "64 MiB"})
        other = await new_vm(client, "numeric")
        one_block = await run(client, vm_id, "b = bytearray(1 << 30)")
        assert one_block["status"] == "error" and one_block["error"]["type"] == "MemoryError"
        creeping = await run(client, vm_id, "blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 20))")
        assert creeping["status"] == "error" and creeping["error"]["type"] == "MemoryError"
        assert (await run(client, vm_id, "del blocks\nsum(range(10))"))["value"] == "45"
        assert (await call(client, other, "add", 1, 2))["results"] == [3]


async def test_an_output_flood_is_refused_by_name(session) -> None:
    async with session() as (client, _):
        vm_id = await python_vm(client, limits={"vm_output_bytes": "64 KiB"})
        error = await refused(client, "vm.eval", {"vm_id": vm_id, "code": "print('x' * 200_000)"}, code=-32002)
        assert error.data["limit"] == "vm_output_bytes" and error.data["session"] == "lost"
        assert (await run(client, vm_id, "print('fine')"))["stdout"] == "fine\n"


async def test_fresh_interpreters_never_share_a_random_stream(session) -> None:
    code = "import random, os\n(random.random(), os.urandom(8).hex())"
    async with session() as (client, _):
        stateless = await python_vm(client, mode="stateless")
        draws = [(await run(client, stateless, code))["value"] for _ in range(3)]
        for _ in range(2):
            draws.append((await run(client, await python_vm(client), code))["value"])
    numbers, urandoms = zip(*(eval(draw) for draw in draws), strict=True)
    assert len(set(numbers)) == len(numbers) and len(set(urandoms)) == len(urandoms)


async def test_the_vms_wasi_view_is_what_python_reaches(session, tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("hello")
    wasi = {"preopens": [{"host_path": str(tmp_path), "guest_path": "/data"}], "env": {"GREETING": "hi"}}
    async with session() as (client, _):
        vm_id = await python_vm(client, wasi=wasi)
        code = "import os\n(open('/data/data.txt').read(), os.environ.get('GREETING'))"
        assert (await run(client, vm_id, code))["value"] == repr(("hello", "hi"))
        for escape in ("open('/data/../../etc/passwd').read()", "open('/etc/hostname').read()",
                       "open('/python/lib/x', 'w')", "open('/data/new.txt', 'w')"):
            answer = await run(client, vm_id, escape)
            assert answer["status"] == "error", escape
        assert not (tmp_path / "new.txt").exists()
        shadowing = {"preopens": [{"host_path": str(tmp_path), "guest_path": "/python"}]}
        await refused(client, "vm.create", {"runtime": "python", "wasi": shadowing}, code=-32602)


async def test_eval_needs_a_runtime_vm_and_a_runtime_needs_installing(
    session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "numeric")
        error = await refused(client, "vm.eval", {"vm_id": vm_id, "code": "1"}, code=-32602)
        assert error.data["path"] == "$.vm_id"
        await refused(client, "vm.create", {"runtime": "python", "wat": "(module)"}, code=-32602)
        await refused(client, "vm.create", {"runtime": "python", "preinit": {"export": "py_init"}}, code=-32602)
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(tmp_path))  # read by this process's server and by a subprocess
    async with session() as (client, _):
        assert (await rpc(client, "initialize"))["capabilities"]["runtimes"] == []
        error = await refused(client, "vm.create", {"runtime": "python"}, code=-32602)
        assert "wasm-sidecar runtime install python" in error.message


async def test_a_session_snapshotted_in_one_process_goes_on_in_another(tmp_path: Path) -> None:
    path = tmp_path / "session.snapshot"
    async with process_session() as (client, _):
        vm_id = await python_vm(client)
        await run(client, vm_id, "import math\nhistory = [1, 2]\ndef twice(n):\n    return 2 * n")
        written = await rpc(client, "vm.snapshot", {"vm_id": vm_id, "path": str(path)})
        assert written["size_bytes"] == path.stat().st_size
    async with process_session() as (client, _):
        with anyio.fail_after(WAIT):
            restored = (await rpc(client, "vm.restore", {"path": str(path)}))["vm_id"]
        answer = await run(client, restored, "history.append(3)\n(twice(21), history, round(math.pi, 2))")
        assert answer["value"] == "(42, [1, 2, 3], 3.14)"
        again = await run(client, restored, "import random\nrandom.random() < 1")
        assert again["value"] == "True"


async def test_a_session_snapshot_names_its_runtimes_module_instead_of_embedding_it(tmp_path: Path) -> None:
    """The bake is made again (or found in the cache) wherever the runtime is installed; a file
    that names another bake, or leaves out a module without being a runtime's, is refused."""
    path = tmp_path / "session.snapshot"
    async with process_session() as (client, _):
        vm_id = await python_vm(client)
        await run(client, vm_id, "n = 7")
        await rpc(client, "vm.snapshot", {"vm_id": vm_id, "path": str(path)})
        state = read_state(path)
        assert state.runtime == "python" and state.module == b""
        assert state.baseline == state.module_id  # the memory is stored as changes to the bake's
        other = "sha256:" + "0" * 64
        other_build = write_state(tmp_path / "other.snapshot", replace(state, module_id=other, baseline=other))
        error = await refused(client, "vm.restore", {"path": str(other_build)}, code=-32006)
        assert error.data["stage"] == "module" and error.data["found"] == state.module_id
        assert "another build" in error.message and "changes to that build" in error.message
        not_a_runtime = write_state(tmp_path / "plain.snapshot", replace(state, runtime=None))
        error = await refused(client, "vm.restore", {"path": str(not_a_runtime)}, code=-32006)
        assert error.data["stage"] == "module"
        restored = (await rpc(client, "vm.restore", {"path": str(path)}))["vm_id"]
        assert (await run(client, restored, "n * 6"))["value"] == "42"
