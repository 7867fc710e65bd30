"""The Python host API through the real process: the typed operations, the host-call handler,
and cancelling the calling scope, which must stop the work in the sidecar, not only the wait.

The operations mirror the Node package's (`clients/node`), so the two clients stay one API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from protocol.client import HostError, RemoteError, SidecarClient
from protocol.methods_runtime import EvalResult
from protocol.methods_vm import VmCallResult

from .guests import wat
from .support import WAIT, process_session

pytestmark = pytest.mark.anyio
ECHO = wat("abi")  # `add`, `echo` (output := input), and a counter kept across calls
SPIN = "import sidecar\nsidecar.host_call('started', None)\nwhile True: pass"
# Far longer than any wait below: a loop the sidecar failed to stop would hold its VM this long.
CALL_TIMEOUT_MS = 600_000


async def test_typed_operations_drive_a_wasm_vm(tmp_path: Path) -> None:
    async with process_session() as (client, _):
        loaded = await client.load_module(wat=ECHO)
        assert loaded.module_id.startswith("sha256:")  # (compiled or from the shared on-disk cache)
        assert {"add", "echo"} <= {export.name for export in loaded.exports}
        vm_id = (await client.create_vm(module_id=loaded.module_id)).vm_id
        added = await client.call(vm_id, "add", args=[2, 3])
        assert isinstance(added, VmCallResult) and added.results == [5]
        assert (await client.call(vm_id, "echo", input="héllo")).output == "héllo"
        assert (await client.call(vm_id, "echo", input=b"\xff\x00")).output_base64 == b"\xff\x00"
        written = await client.snapshot(vm_id, str(tmp_path / "vm.snap"))
        assert written.path == str(tmp_path / "vm.snap") and written.size_bytes == (tmp_path / "vm.snap").stat().st_size
        restored = await client.restore(written.path)
        assert restored.vm_id != vm_id and restored.pending_host_calls == []
        assert (await client.call(restored.vm_id, "add", args=[4, 5])).results == [9]
        await client.dispose(vm_id)
        with pytest.raises(RemoteError) as refused:
            await client.call(vm_id, "add", args=[1, 1])
        assert (refused.value.code, refused.value.kind, refused.value.data["vm_id"]) == (-32001, "vm_not_found", vm_id)


@pytest.mark.usefixtures("python_runtime")
async def test_eval_and_the_host_call_handler() -> None:
    async def host(vm_id: str, method: str, params: Any) -> Any:
        if method == "fail":
            raise HostError(-32050, "refused", {"why": params["why"]})
        return [vm_id, method, params]

    async with process_session() as (client, _):
        vm_id = (await client.create_vm(runtime="python")).vm_id
        with anyio.fail_after(WAIT):
            unanswered = await client.eval(vm_id, "import sidecar\nsidecar.host_call('x', 1)")
        assert unanswered.status == "error" and "-32601" in unanswered.error.message  # no handler yet
        client.on_host_call(host)
        answered = await client.eval(vm_id, "import sys\nprint(sys.stdin.read())\nsidecar.host_call('kv', {'k': 1})",
                                     stdin="in")
        assert isinstance(answered, EvalResult)
        assert (answered.status, answered.stdout, answered.value) == ("ok", "in\n", f"['{vm_id}', 'kv', {{'k': 1}}]")
        failed = await client.eval(vm_id, "try:\n    sidecar.host_call('fail', {'why': 'test'})\n"
                                          "except sidecar.HostError as e:\n    r = (e.code, e.data)\nr")
        assert failed.value == "(-32050, {'why': 'test'})"
        with pytest.raises(RemoteError) as timed_out:
            await client.eval(vm_id, "while True: pass", timeout_ms=100)
        assert (timed_out.value.code, timed_out.value.data["limit"], timed_out.value.data["capacity"]) == (
            -32004, "vm_call_timeout_ms", 100)


async def spin_then(client: SidecarClient, vm_id: str, started: anyio.Event) -> None:
    """Runs an endless loop in `vm_id`, which sets `started` once it runs."""
    async def host(_vm_id: str, method: str, _params: Any) -> None:
        assert method == "started"
        started.set()

    client.on_host_call(host)
    await client.eval(vm_id, SPIN)


async def assert_free(client: SidecarClient, vm_id: str) -> None:
    """The VM answers at once: it runs one eval at a time, so the loop before this was stopped."""
    with anyio.fail_after(WAIT):
        assert (await client.eval(vm_id, "'free'")).value == "'free'"
    assert (await client.request("sidecar.stats"))["requests_in_flight"] == 0


@pytest.mark.usefixtures("python_runtime")
async def test_cancelling_the_scope_cancels_the_request_in_the_sidecar() -> None:
    async with process_session(env={"SIDECAR_VM_CALL_TIMEOUT_MS": str(CALL_TIMEOUT_MS)}) as (client, _):
        vm_id = (await client.create_vm(runtime="python")).vm_id
        started = anyio.Event()
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(spin_then, client, vm_id, started)
                await started.wait()
                tg.cancel_scope.cancel()
        await assert_free(client, vm_id)


@pytest.mark.usefixtures("python_runtime")
async def test_a_timeout_cancels_the_request_in_the_sidecar() -> None:
    async with process_session(env={"SIDECAR_VM_CALL_TIMEOUT_MS": str(CALL_TIMEOUT_MS)}) as (client, _):
        vm_id = (await client.create_vm(runtime="python")).vm_id
        with pytest.raises(TimeoutError):
            await client.request("vm.eval", {"vm_id": vm_id, "code": "while True: pass"}, timeout_s=0.5)
        await assert_free(client, vm_id)


async def test_a_request_over_the_frame_bound_is_refused_by_the_client() -> None:
    """The sidecar answers an oversized frame with id null (it cannot read the id), so a client
    that sent it would wait for ever: once `initialize` told it the bound, the client refuses the
    request itself with the sidecar's own error, and the connection serves on."""
    frame_bytes = 64 * 1024
    async with process_session(env={"SIDECAR_PROTOCOL_FRAME_BYTES": str(frame_bytes)}) as (client, _):
        await client.request("initialize", {"protocol_version": 1})
        with anyio.fail_after(WAIT), pytest.raises(RemoteError) as refused:
            await client.create_vm(wat=f'(module (func (export "f")) (@custom "pad" "{"x" * frame_bytes}"))')
        assert refused.value.code == -32600
        data = refused.value.data
        assert (data["limit"], data["capacity"], data["env"]) == (
            "protocol_frame_bytes", frame_bytes, "SIDECAR_PROTOCOL_FRAME_BYTES")
        assert data["observed"] > frame_bytes
        assert (await client.load_module(wat=ECHO)).module_id.startswith("sha256:")
