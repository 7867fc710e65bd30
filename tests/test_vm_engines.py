"""Engines end to end: one per distinct engine setting, at most `runner_engines` of them.

An engine no VM needs is dropped (least recently used first) when another setting needs a slot;
one that VMs still run on keeps being ticked, so their deadlines hold; when every slot is in use,
a `vm.create` that needs one more is refused by name and the sidecar serves on. A module
compiled for a dropped engine is compiled again for the next one, never reused with it (wasmtime
aborts the process on that).
"""

from __future__ import annotations

import time

import anyio
import pytest

from protocol.client import RemoteError

from .guests import call, new_vm, refused, rpc, until_busy, wat
from .support import WAIT

pytestmark = pytest.mark.anyio
KiB = 1024


def stack(i: int) -> int:
    """A distinct `vm_stack_bytes` per `i`: each is an engine setting of its own."""
    return 64 * KiB + i * 4 * KiB


async def engines(client) -> int:
    return (await rpc(client, "sidecar.stats"))["engines"]


async def test_distinct_engine_settings_keep_the_engine_count_bounded(session) -> None:
    async with session() as (client, _):
        rows = (await rpc(client, "sidecar.limits"))["limits"]
        capacity = next(row["value"] for row in rows if row["name"] == "runner_engines")
        for i in range(40):
            vm_id = await new_vm(client, "numeric", limits={"vm_stack_bytes": stack(i)})
            assert (await call(client, vm_id, "add", i, 1))["results"] == [i + 1]
            assert await rpc(client, "vm.dispose", {"vm_id": vm_id}) == {}
            assert await engines(client) <= capacity
        assert await engines(client) == capacity


async def test_a_new_engine_is_refused_by_name_while_every_engine_is_in_use(session) -> None:
    async with session(env={"SIDECAR_RUNNER_ENGINES": "2"}) as (client, _):
        await new_vm(client, "numeric")
        small = await new_vm(client, "numeric", limits={"vm_stack_bytes": stack(0)})
        for limits in ({"vm_stack_bytes": stack(1)}, {"vm_fuel": 1_000_000}):
            error = await refused(client, "vm.create", {"wat": wat("numeric"), "limits": limits}, code=-32002)
            assert error.data["limit"] == "runner_engines" and error.data["env"] == "SIDECAR_RUNNER_ENGINES"
            assert error.data["capacity"] == 2 and error.data["observed"] == 3
        # the sidecar serves on, and VMs on an engine in use are still created
        assert (await call(client, small, "add", 1, 2))["results"] == [3]
        again = await new_vm(client, "numeric", limits={"vm_stack_bytes": stack(0)})
        assert await rpc(client, "vm.dispose", {"vm_id": small}) == {}
        await refused(client, "vm.create", {"wat": wat("numeric"), "limits": {"vm_stack_bytes": stack(1)}},
                      code=-32002)  # `again` still runs on that engine
        assert await rpc(client, "vm.dispose", {"vm_id": again}) == {}
        vm_id = await new_vm(client, "numeric", limits={"vm_stack_bytes": stack(1)})
        assert (await call(client, vm_id, "add", 2, 2))["results"] == [4]
        assert await engines(client) == 2


async def test_an_engine_in_use_keeps_its_deadlines_while_others_come_and_go(session) -> None:
    timeout_ms = 300
    async with session(env={"SIDECAR_RUNNER_ENGINES": "2"}) as (client, _):
        held = await new_vm(client, "faults", limits={"vm_stack_bytes": stack(0), "vm_call_timeout_ms": timeout_ms})
        for i in range(1, 6):  # each one evicts the idle engine before it, never the held one
            vm_id = await new_vm(client, "numeric", limits={"vm_stack_bytes": stack(i)})
            assert await rpc(client, "vm.dispose", {"vm_id": vm_id}) == {}
        started = time.monotonic()
        error = await refused(client, "vm.call", {"vm_id": held, "export": "spin"}, code=-32004)
        assert error.data["limit"] == "vm_call_timeout_ms" and error.data["capacity"] == timeout_ms
        assert (time.monotonic() - started) * 1000 <= 1.3 * timeout_ms
        assert (await call(client, held, "pages"))["results"] == [1]



async def test_a_disposed_vm_keeps_its_engine_until_its_guest_has_stopped(session) -> None:
    """A dispose stops a running guest at its engine's next tick: were the engine dropped first, it
    would never come. Long ticks leave the time to ask for a new setting in between."""
    env = {"SIDECAR_RUNNER_ENGINES": "2", "SIDECAR_RUNNER_EPOCH_TICK_MS": "200"}
    async with session(env=env) as (client, _):
        spinning = await new_vm(client, "faults", limits={"vm_stack_bytes": stack(0)})
        idle = await new_vm(client, "numeric", limits={"vm_stack_bytes": stack(1)})
        assert await rpc(client, "vm.dispose", {"vm_id": idle}) == {}  # its engine: unheld, more recently used
        _, result = await client.start_request("vm.call", {"vm_id": spinning, "export": "spin"})
        await until_busy(client, spinning)
        assert await rpc(client, "vm.dispose", {"vm_id": spinning}) == {}
        vm_id = await new_vm(client, "numeric", limits={"vm_stack_bytes": stack(2)})  # takes the idle one's slot
        with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
            await result()
        assert caught.value.code in (-32800, -32001)
        assert (await call(client, vm_id, "add", 1, 1))["results"] == [2]
        assert await engines(client) == 2

async def test_a_module_whose_engine_was_dropped_is_compiled_again_for_the_next_one(session) -> None:
    async with session(env={"SIDECAR_RUNNER_ENGINES": "2"}) as (client, _):
        module_id = (await rpc(client, "module.load", {"wat": wat("numeric")}))["module_id"]
        for i in range(4):  # the module's own engine and each setting's before it are dropped in turn
            vm_id = (await rpc(client, "vm.create", {"module_id": module_id,
                                                     "limits": {"vm_stack_bytes": stack(i)}}))["vm_id"]
            assert (await call(client, vm_id, "add", i, i))["results"] == [2 * i]
            assert await rpc(client, "vm.dispose", {"vm_id": vm_id}) == {}
        for limits in ({}, {"vm_stack_bytes": stack(0)}):  # settings whose first engine is gone
            vm_id = (await rpc(client, "vm.create", {"module_id": module_id, "limits": limits}))["vm_id"]
            assert (await call(client, vm_id, "add", 20, 22))["results"] == [42]
            assert await rpc(client, "vm.dispose", {"vm_id": vm_id}) == {}
        assert await rpc(client, "ping") == {}
