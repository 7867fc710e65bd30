"""A cancelled `vm.create`, `vm.restore` or `module.load` leaves nothing behind.

The host that got -32800 must find no VM it did not ask for: none in `vm.list`, none counted in
`sidecar.stats` or against `runner_vms`, no pending host call of a half-restored VM. A compile
cannot be interrupted, so the work may run on after the answer; `sidecar.stats.vms_starting`
shows it, and each test waits for it to end before looking. The slow step is made by the test:
a start function blocked in `host_call` until the test answers, or a large module whose compile
no cache has seen.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

import anyio
import pytest
import wasmtime

from protocol.client import PendingResult, RemoteError, SidecarClient
from sidecar.snapshot_file import PendingCall

from .guests import call, refused, rpc
from .snapshot_support import HONEST_STATE, honest_state, replace, write_state
from .support import WAIT

pytestmark = pytest.mark.anyio
ONE_VM = {"SIDECAR_RUNNER_VMS": "1"}  # a leaked VM, or a leaked count, makes the next create fail

# Its start function asks the host and waits for the answer: vm.create is mid-way until then.
ASKS_AT_START = r"""
(module
  (import "sidecar" "host_call" (func $host_call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "hold{}")
  (func $start (drop (call $host_call (i32.const 0) (i32.const 4) (i32.const 4) (i32.const 2))))
  (start $start)
  (func (export "f") (result i32) (i32.const 1))
)
"""
NUMERIC = '(module (func (export "one") (result i32) (i32.const 1)))'


def slow_module() -> bytes:
    """A module that takes about a second to compile, new to every cache (a random constant)."""
    salt = secrets.randbits(31)
    body = "local.get 0 " + "i32.const 7 i32.mul i32.const 5 i32.xor " * 100 + f"i32.const {salt} i32.add"
    funcs = "".join(f'(func (export "f{i}") (param i32) (result i32) {body})' for i in range(2000))
    return bytes(wasmtime.wat2wasm(f"(module {HONEST_STATE} {funcs})"))


async def until_stats(client: SidecarClient, **expected: int) -> dict[str, Any]:
    """`sidecar.stats` once it shows `expected` (within `WAIT`)."""
    with anyio.fail_after(WAIT):
        while True:
            stats = await client.request("sidecar.stats")
            if all(stats[name] == value for name, value in expected.items()):
                return stats


async def cancelled(client: SidecarClient, request_id: str, result: PendingResult) -> None:
    await client.cancel(request_id)
    with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
        await result()
    assert caught.value.code == -32800, (caught.value.code, caught.value.message)


async def nothing_left(client: SidecarClient) -> None:
    """No VM, nothing counted, nothing pending; and the one `runner_vms` slot is free."""
    stats = await until_stats(client, vms_starting=0)
    assert stats["vms"] == 0 and stats["host_calls_pending"] == 0, stats
    assert (await rpc(client, "vm.list"))["vms"] == []
    vm_id = (await rpc(client, "vm.create", {"wat": NUMERIC}))["vm_id"]
    assert (await call(client, vm_id, "one"))["results"] == [1]


async def test_a_vm_create_cancelled_in_its_start_function_leaves_no_vm(session) -> None:
    entered, release = anyio.Event(), anyio.Event()

    async def host(vm_id: str, method: str, params: Any) -> Any:
        entered.set()
        await release.wait()
        return {}

    async with session(env=ONE_VM, host_handler=host) as (client, _):
        request_id, result = await client.start_request("vm.create", {"wat": ASKS_AT_START})
        with anyio.fail_after(WAIT):
            await entered.wait()
        assert (await rpc(client, "sidecar.stats"))["vms_starting"] == 1
        await refused(client, "vm.create", {"wat": NUMERIC}, code=-32002)  # the slot is taken meanwhile
        await cancelled(client, request_id, result)
        release.set()  # the start function returns: the VM is complete, and nobody wants it any more
        await nothing_left(client)


async def test_a_vm_restore_cancelled_while_it_compiles_leaves_no_vm(session, tmp_path) -> None:
    """The snapshot waits on a host call: a half-restored VM would leave it pending too."""
    state = honest_state(slow_module())
    call_id = "feedbeef0000.1"
    waiting = replace(state, next_ticket=1,
                      pending_host_calls=[PendingCall(id=call_id, ticket=0, method="kv.get", params=b"{}")])
    path = write_state(tmp_path / "slow.state", waiting)
    async with session(env=ONE_VM) as (client, _):
        request_id, result = await client.start_request("vm.restore", {"path": str(path)})
        await until_stats(client, vms_starting=1)  # reading and compiling
        await cancelled(client, request_id, result)
        await nothing_left(client)
        # The restore can be done again: its host call is nobody's.
        await rpc(client, "vm.dispose", {"vm_id": (await rpc(client, "vm.list"))["vms"][0]["vm_id"]})
        restored = await rpc(client, "vm.restore", {"path": str(path)})
        assert [call["id"] for call in restored["pending_host_calls"]] == [call_id]


async def test_a_module_load_cancelled_while_it_compiles_keeps_only_the_compiled_code(session) -> None:
    """What a cancelled load may leave is a cache entry: the same bytes load again, cached or not."""
    wasm = slow_module()
    source = {"wasm_base64": base64.b64encode(wasm).decode()}
    async with session(env=ONE_VM) as (client, _):
        request_id, result = await client.start_request("module.load", source)
        await until_stats(client, requests_in_flight=1)
        await cancelled(client, request_id, result)
        loaded = await rpc(client, "module.load", source)
        assert loaded["size_bytes"] == len(wasm)
        await nothing_left(client)
