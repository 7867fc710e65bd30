"""When vm.snapshot says no, and that it says why: busy VMs and state that cannot be captured.

A VM with guest frames on its stack (a call running, a guest blocked in `host_call`) is refused
rather than waited for; modules whose state cannot be rebuilt faithfully run normally but their
snapshots are refused with the reasons; VMs that keep no state (stateless, WASI commands) have
nothing to snapshot. Every refusal leaves the VM and the sidecar serving.
"""

from __future__ import annotations

import anyio
import pytest

from .guests import call, refused, rpc, until_busy, vm_info, wat
from .snapshot_support import SECRET, restore, snapshot
from .support import WAIT

pytestmark = pytest.mark.anyio

COMMAND = """(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (global $g (mut i32) (i32.const 0))
  (func (export "_start") (global.set $g (i32.const 1))))"""


async def test_a_guest_blocked_in_host_call_is_refused_until_the_host_answers(session, tmp_path) -> None:
    entered, release = anyio.Event(), anyio.Event()

    async def host(vm_id: str, method: str, params: object) -> dict:
        entered.set()
        await release.wait()
        return {"value": 7}

    async with session(host_handler=host) as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": wat("abi")}))["vm_id"]
        _, result = await client.start_request("vm.call", {"vm_id": vm_id, "export": "ask", "input": "{}"})
        with anyio.fail_after(WAIT):
            await entered.wait()
        for format in ("state", "wasm"):
            error = await refused(client, "vm.snapshot",
                                  {"vm_id": vm_id, "path": str(tmp_path / f"busy.{format}"), "format": format},
                                  code=-32602)
            assert "guest frames" in error.message
            assert error.data["path"] == "$.vm_id" and error.data["state"] == "busy"
        assert not list(tmp_path.iterdir())  # nothing half-written
        release.set()
        with anyio.fail_after(WAIT):
            answer = await result()
        assert answer["results"] == [len('{"value":7}')]
        await snapshot(client, vm_id, tmp_path / "idle.state")
        restored = (await restore(client, tmp_path / "idle.state"))["vm_id"]
        assert (await call(client, restored, "count"))["results"] == [1]


async def test_a_running_call_is_refused_and_the_vm_snapshots_once_it_ends(session, tmp_path) -> None:
    async with session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": wat("abi")}))["vm_id"]
        await call(client, vm_id, "count")
        request_id, result = await client.start_request("vm.call", {"vm_id": vm_id, "export": "spin"})
        await until_busy(client, vm_id)
        error = await refused(client, "vm.snapshot", {"vm_id": vm_id, "path": str(tmp_path / "s")}, code=-32602)
        assert error.data["state"] == "busy"
        await client.cancel(request_id)
        with anyio.fail_after(WAIT), pytest.raises(Exception) as caught:
            await result()
        assert getattr(caught.value, "code", None) == -32800
        await until_idle(client, vm_id)  # the answer can come before the guest has unwound
        await snapshot(client, vm_id, tmp_path / "after.state")
        restored = (await restore(client, tmp_path / "after.state"))["vm_id"]
        assert (await call(client, restored, "count"))["results"] == [2]


async def until_idle(client, vm_id: str) -> None:
    with anyio.fail_after(WAIT):
        while (await vm_info(client, vm_id))["state"] != "idle":
            pass


TABLE = "(table $t 2 funcref) (elem declare func $f) (func $f)"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (TABLE + "(func (export \"mutate\") (table.set $t (i32.const 0) (ref.func $f)))", "mutates a table"),
        (TABLE + "(func (export \"mutate\") (drop (table.grow $t (ref.null func) (i32.const 1))))",
         "mutates a table"),
        ('(memory 1) (data $d "abc") (func (export "mutate") (data.drop $d))', "drops a data segment"),
        ("(global $r (mut funcref) (ref.null func)) (func (export \"mutate\"))", "reference type funcref"),
    ],
    ids=["table.set", "table.grow", "data.drop", "funcref-global"],
)
async def test_modules_whose_state_cannot_be_captured_run_but_are_not_snapshotted(session, tmp_path, body,
                                                                                 reason) -> None:
    guest = f'(module {body} (func (export "ok") (result i32) (i32.const 42)))'
    async with session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": guest}))["vm_id"]
        await call(client, vm_id, "mutate")
        for format in ("state", "wasm"):
            error = await refused(client, "vm.snapshot",
                                  {"vm_id": vm_id, "path": str(tmp_path / "x"), "format": format}, code=-32602)
            assert error.data["path"] == "$.vm_id"
            assert len(error.data["reasons"]) == 1 and reason in error.data["reasons"][0], error.data
            assert reason in error.message
        assert (await call(client, vm_id, "ok"))["results"] == [42]
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("source", ['(import "env" "memory" (memory 1))', '(import "sidecar" "memory" (memory 1))'])
async def test_an_imported_memory_is_refused_at_vm_create(session, source) -> None:
    async with session() as (client, _):
        error = await refused(client, "vm.create", {"wat": f"(module {source})"}, code=-32005)
        assert error.data["stage"] == "imports"
        assert await rpc(client, "ping") == {}


async def test_a_stateless_vm_has_no_state_to_snapshot(session, tmp_path) -> None:
    async with session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": SECRET, "mode": "stateless"}))["vm_id"]
        await call(client, vm_id, "next")
        for format in ("state", "wasm"):
            error = await refused(client, "vm.snapshot",
                                  {"vm_id": vm_id, "path": str(tmp_path / "s"), "format": format}, code=-32602)
            assert error.data["path"] == "$.vm_id" and "stateful" in error.message
        assert (await call(client, vm_id, "next"))["results"][0] >= 1  # it serves on


async def test_a_wasi_command_vm_has_no_state_to_snapshot(session, tmp_path) -> None:
    async with session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": COMMAND}))["vm_id"]
        assert (await rpc(client, "vm.run", {"vm_id": vm_id}))["exit_code"] == 0
        error = await refused(client, "vm.snapshot", {"vm_id": vm_id, "path": str(tmp_path / "s")}, code=-32602)
        assert error.data["path"] == "$.vm_id"
        assert not (tmp_path / "s").exists()
        assert (await rpc(client, "vm.run", {"vm_id": vm_id}))["exit_code"] == 0


async def test_a_wasi_reactor_is_snapshotted_and_restored_with_wasi(session, tmp_path) -> None:
    """A stateful VM that imports WASI: the restored store must have WASI too (or wasmtime aborts)."""
    async with session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": wat("wasi_reactor"), "wasi": {"args": ["x"]}}))["vm_id"]
        assert (await call(client, vm_id, "random"))["results"] == [0]
        await snapshot(client, vm_id, tmp_path / "reactor.state")
        restored = (await restore(client, tmp_path / "reactor.state"))["vm_id"]
        assert (await call(client, restored, "random"))["results"] == [0]
        assert (await call(client, restored, "add", 2, 3))["results"] == [5]


async def test_unknown_vms_are_refused_with_vm_not_found(session, tmp_path) -> None:
    async with session() as (client, _):
        error = await refused(client, "vm.snapshot", {"vm_id": "vm-404", "path": str(tmp_path / "s")},
                              code=-32001)
        assert error.data["vm_id"] == "vm-404"
        vm_id = (await rpc(client, "vm.create", {"wat": SECRET}))["vm_id"]
        await rpc(client, "vm.dispose", {"vm_id": vm_id})
        await refused(client, "vm.snapshot", {"vm_id": vm_id, "path": str(tmp_path / "s")}, code=-32001)
