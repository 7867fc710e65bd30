"""Guest budgets end to end: per-VM limits, memory, payloads, fuel, deadlines, start functions.

Every budget that bites must name itself (limit, env, capacity, observed), end only the call
that hit it, and leave the VM and the sidecar serving.
"""

from __future__ import annotations

import base64
import time

import anyio
import pytest

from .guests import (
    call,
    new_vm,
    output_bytes,
    refused,
    rpc,
    vm_info,
    wat,
)
from .support import WAIT, memory_session

pytestmark = pytest.mark.anyio
MiB = 1 << 20
PAGE = 65536
TIMEOUT_MS = 300  # long enough that the round trip around it is a small share of 1.3x


# -- per-VM limits ----------------------------------------------------------------------------


async def test_a_lowered_call_timeout_is_enforced_for_that_vm_only(session) -> None:
    async with session() as (client, _):
        tight = await new_vm(client, "faults", limits={"vm_call_timeout_ms": TIMEOUT_MS})
        loose = await new_vm(client, "faults")
        started = time.monotonic()
        error = await refused(client, "vm.call", {"vm_id": tight, "export": "spin"}, code=-32004)
        assert TIMEOUT_MS <= (time.monotonic() - started) * 1000 <= 1.3 * TIMEOUT_MS
        assert error.kind == "timeout" and error.data["limit"] == "vm_call_timeout_ms"
        assert error.data["env"] == "SIDECAR_VM_CALL_TIMEOUT_MS" and error.data["capacity"] == TIMEOUT_MS
        # a per-call timeout_ms never raises the VM's own budget
        error = await refused(client, "vm.call", {"vm_id": tight, "export": "spin", "timeout_ms": 60_000}, code=-32004)
        assert error.data["capacity"] == TIMEOUT_MS
        # the other VM keeps the sidecar's budget: a burn that outlasts 100 ms completes there
        burn = await call(client, loose, "burn", 400_000_000)
        assert burn["results"] == [400_000_000]
        assert (await call(client, tight, "pages"))["results"] == [1]
        assert (await vm_info(client, tight))["state"] == "idle"


async def test_a_lowered_output_budget_is_enforced(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "abi", limits={"vm_output_bytes": 1000})
        assert len(output_bytes(await call(client, vm_id, "emit", 500, 2))) == 1000  # exactly at the cap
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "emit", "args": [600, 2]}, code=-32002)
        assert error.data["limit"] == "vm_output_bytes" and error.data["env"] == "SIDECAR_VM_OUTPUT_BYTES"
        assert error.data["capacity"] == 1000 and error.data["observed"] == 1200
        assert (await call(client, vm_id, "count"))["results"] == [1]


@pytest.mark.parametrize(
    ("name", "value", "ceiling"),
    [
        ("vm_memory_bytes", "1 GiB", 128 * MiB),
        ("vm_call_timeout_ms", 3_600_000, 30_000),
        ("vm_output_bytes", 64 * MiB, 4 * MiB),
        ("vm_stack_bytes", "8 MiB", MiB),
    ],
)
async def test_a_vm_may_not_raise_a_budget(session, name, value, ceiling) -> None:
    async with session() as (client, _):
        error = await refused(client, "vm.create", {"wat": wat("numeric"), "limits": {name: value}}, code=-32002)
        assert error.kind == "limit_exceeded" and error.data["limit"] == name
        assert error.data["env"] == "SIDECAR_" + name.upper() and error.data["capacity"] == ceiling
        assert error.data["observed"] > ceiling
        assert (await rpc(client, "sidecar.stats"))["vms"] == 0


async def test_turning_fuel_off_for_one_vm_is_raising_it(session) -> None:
    async with session(env={"SIDECAR_VM_FUEL": "1000000"}) as (client, _):
        error = await refused(client, "vm.create", {"wat": wat("numeric"), "limits": {"vm_fuel": 0}}, code=-32002)
        assert error.data["limit"] == "vm_fuel" and error.data["env"] == "SIDECAR_VM_FUEL"


@pytest.mark.parametrize(
    ("limits", "path"),
    [
        ({"vm_bogus_bytes": 1}, "$.limits.vm_bogus_bytes"),
        ({"runner_vms": 1}, "$.limits.runner_vms"),  # not a guest limit
        ({"protocol_frame_bytes": 4096}, "$.limits.protocol_frame_bytes"),
        ({"vm_memory_bytes": "lots"}, "$.limits.vm_memory_bytes"),
        ({"vm_memory_bytes": -1}, "$.limits.vm_memory_bytes"),
    ],
)
async def test_unknown_or_untunable_limits_are_invalid_params(session, limits, path) -> None:
    async with session() as (client, _):
        error = await refused(client, "vm.create", {"wat": wat("numeric"), "limits": limits}, code=-32602)
        assert error.data["path"] == path, error.data


# -- memory -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("limits", "capacity"), [(None, 128 * MiB), ({"vm_memory_bytes": "1 MiB"}, MiB)])
async def test_a_declared_memory_over_the_budget_is_refused_before_instantiating(session, limits, capacity) -> None:
    pages = capacity // PAGE + 1
    params = {"wat": wat("memory", PAGES=pages), **({"limits": limits} if limits else {})}
    async with session() as (client, _):
        error = await refused(client, "vm.create", params, code=-32002)
        assert error.data["limit"] == "vm_memory_bytes" and error.data["env"] == "SIDECAR_VM_MEMORY_BYTES"
        assert error.data["capacity"] == capacity and error.data["observed"] == pages * PAGE
        fits = {"wat": wat("memory", PAGES=pages - 1), **({"limits": limits} if limits else {})}
        vm_id = (await rpc(client, "vm.create", fits))["vm_id"]
        assert (await call(client, vm_id, "pages"))["results"] == [pages - 1]


async def test_memory_grow_past_the_budget_returns_minus_one_to_the_guest(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "faults", limits={"vm_memory_bytes": "1 MiB"})
        assert (await call(client, vm_id, "grow", 15))["results"] == [1]  # 16 pages: exactly 1 MiB
        assert (await call(client, vm_id, "grow", 1))["results"] == [-1]
        assert (await call(client, vm_id, "grow", 65536))["results"] == [-1]
        assert (await call(client, vm_id, "pages"))["results"] == [16]
        assert (await call(client, vm_id, "touch_last"))["results"] == [7]
        assert (await vm_info(client, vm_id))["memory_bytes"] == MiB
        other = await new_vm(client, "faults")
        assert (await call(client, other, "grow", 100))["results"] == [1]


async def test_a_memory_bomb_at_the_default_budget_is_refused_by_the_guests_own_grow(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "faults")
        assert (await call(client, vm_id, "grow", 2047))["results"] == [1]  # 128 MiB in all
        assert (await call(client, vm_id, "grow", 1))["results"] == [-1]
        assert (await vm_info(client, vm_id))["memory_bytes"] == 128 * MiB
        assert await rpc(client, "vm.dispose", {"vm_id": vm_id}) == {}
        assert await rpc(client, "ping") == {}



def _declaring(*fields: str) -> str:
    return f'(module {" ".join(fields)} (func (export "one") (result i32) (i32.const 1)))'


@pytest.mark.parametrize(
    ("fields", "limits", "name", "capacity", "observed"),
    [
        (["(table 200000 funcref)"], None, "vm_table_elements", 100_000, 200_000),
        (["(table 1 funcref)", "(table 50 funcref)"], {"vm_table_elements": 40}, "vm_table_elements", 40, 50),
        (["(table 1 funcref)"] * 17, None, "vm_tables", 16, 17),
        (["(table 1 funcref)"] * 3, {"vm_tables": 2}, "vm_tables", 2, 3),
        (["(memory 1)"] * 5, None, "vm_memories", 4, 5),
        (["(memory 1)"] * 2, {"vm_memories": 1}, "vm_memories", 1, 2),
    ],
)
async def test_declared_tables_and_memories_over_their_store_limits_are_refused_before_instantiating(
    session, fields, limits, name, capacity, observed
) -> None:
    """wasmtime refuses these at instantiation with a generic error; the sidecar names the limit,
    whichever way the module comes (a sidecar-wide limit refuses it at module.load already)."""
    extra = {"limits": limits} if limits else {}
    async with session() as (client, _):
        refusals = [await refused(client, "vm.create", {"wat": _declaring(*fields), **extra}, code=-32002)]
        if limits:
            module_id = (await rpc(client, "module.load", {"wat": _declaring(*fields)}))["module_id"]
            refusals.append(await refused(client, "vm.create", {"module_id": module_id, **extra}, code=-32002))
        else:
            refusals.append(await refused(client, "module.load", {"wat": _declaring(*fields)}, code=-32002))
        for error in refusals:
            assert error.data["limit"] == name and error.data["env"] == "SIDECAR_" + name.upper()
            assert error.data["capacity"] == capacity and error.data["observed"] == observed
        # exactly at the limit instantiates
        fits = [field.replace(str(observed), str(capacity)) for field in fields] if name == "vm_table_elements" \
            else fields[:capacity]
        vm_id = (await rpc(client, "vm.create", {"wat": _declaring(*fits), **extra}))["vm_id"]
        assert (await call(client, vm_id, "one"))["results"] == [1]


async def test_table_grow_past_the_element_budget_returns_minus_one_to_the_guest(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "tables", limits={"vm_table_elements": 100})
        assert (await call(client, vm_id, "grow", 90))["results"] == [10]  # the old size: now exactly 100
        assert (await call(client, vm_id, "grow", 1))["results"] == [-1]
        assert (await call(client, vm_id, "grow", 1 << 30))["results"] == [-1]
        assert (await call(client, vm_id, "size"))["results"] == [100]
        other = await new_vm(client, "tables")
        assert (await call(client, other, "grow", 1000))["results"] == [10]


# -- payloads ---------------------------------------------------------------------------------


async def test_input_over_vm_input_bytes_is_refused_before_the_guest_runs(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "abi", limits={"vm_input_bytes": 1024})
        assert (await call(client, vm_id, "echo", input="x" * 1024))["results"] == [1024]
        for params in ({"input": "x" * 1025}, {"input_base64": base64.b64encode(b"x" * 1025).decode()}):
            error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "count", **params}, code=-32002)
            assert error.data["limit"] == "vm_input_bytes" and error.data["env"] == "SIDECAR_VM_INPUT_BYTES"
            assert error.data["capacity"] == 1024 and error.data["observed"] > 1024
        assert (await call(client, vm_id, "count"))["results"] == [1]  # the refused calls never ran


async def test_huge_input_at_the_default_budget(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "abi")
        error = await refused(
            client, "vm.call", {"vm_id": vm_id, "export": "echo", "input": "y" * (8 * MiB + 1)}, code=-32002
        )
        assert error.data["limit"] == "vm_input_bytes" and error.data["capacity"] == 8 * MiB
        assert error.data["observed"] == 8 * MiB + 1
        assert (await call(client, vm_id, "echo", input="ok"))["output"] == "ok"


async def test_output_over_the_default_budget(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "abi")
        # 64 KiB x 65 writes: 4 MiB + 64 KiB
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "emit", "args": [PAGE, 65]}, code=-32002)
        assert error.data["limit"] == "vm_output_bytes" and error.data["capacity"] == 4 * MiB
        assert error.data["observed"] == 4 * MiB + PAGE
        assert (await call(client, vm_id, "echo", input="after"))["output"] == "after"


# -- fuel -------------------------------------------------------------------------------------


async def test_fuel_ends_a_runaway_loop_and_is_reported(session) -> None:
    async with session(env={"SIDECAR_VM_FUEL": "1000000"}) as (client, _):
        vm_id = await new_vm(client, "faults")
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "spin"}, code=-32003)
        assert error.data["trap_code"] == "out_of_fuel"
        assert error.data["limit"] == "vm_fuel" and error.data["env"] == "SIDECAR_VM_FUEL"
        assert error.data["capacity"] == 1_000_000
        small, large = await call(client, vm_id, "burn", 100), await call(client, vm_id, "burn", 10_000)
        assert small["results"] == [100] and large["results"] == [10_000]
        assert 0 < small["fuel_used"] < large["fuel_used"] < 1_000_000
        again = await call(client, vm_id, "burn", 100)  # every call gets the whole budget again
        assert again["fuel_used"] == small["fuel_used"]


async def test_a_vm_may_lower_its_fuel(session) -> None:
    async with session(env={"SIDECAR_VM_FUEL": "1000000"}) as (client, _):
        vm_id = await new_vm(client, "faults", limits={"vm_fuel": 5000})
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "burn", "args": [100_000]}, code=-32003)
        assert error.data["trap_code"] == "out_of_fuel" and error.data["capacity"] == 5000
        assert (await call(client, vm_id, "burn", 10))["fuel_used"] < 5000
        other = await new_vm(client, "faults")  # the sidecar's budget: 50_000 rounds fit in it
        assert (await call(client, other, "burn", 50_000))["results"] == [50_000]


async def test_fuel_can_be_turned_on_for_one_vm_when_the_sidecar_meters_none(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "faults", limits={"vm_fuel": 5000})
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "spin"}, code=-32003)
        assert error.data["trap_code"] == "out_of_fuel"
        unmetered = await new_vm(client, "faults")
        assert "fuel_used" not in await call(client, unmetered, "burn", 10)


# -- deadlines --------------------------------------------------------------------------------


async def test_timeout_ms_tightens_the_call_budget_and_the_vm_survives(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "abi")
        assert (await call(client, vm_id, "count"))["results"] == [1]
        started = time.monotonic()
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "spin", "timeout_ms": TIMEOUT_MS},
                              code=-32004)
        assert TIMEOUT_MS <= (time.monotonic() - started) * 1000 <= 1.3 * TIMEOUT_MS
        assert error.data["limit"] == "vm_call_timeout_ms" and error.data["capacity"] == TIMEOUT_MS
        assert error.data["env"] == "SIDECAR_VM_CALL_TIMEOUT_MS"
        assert (await call(client, vm_id, "count"))["results"] == [2]  # state kept, VM usable


async def test_a_zero_timeout_still_answers(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "faults")
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "spin", "timeout_ms": 0}, code=-32004)
        assert error.data["capacity"] == 0
        await refused(client, "vm.call", {"vm_id": vm_id, "export": "spin", "timeout_ms": -1}, code=-32602)


async def test_the_env_call_timeout_applies_to_every_vm(session) -> None:
    async with session(env={"SIDECAR_VM_CALL_TIMEOUT_MS": "80"}) as (client, _):
        vm_id = await new_vm(client, "faults")
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "spin"}, code=-32004)
        assert error.data["capacity"] == 80


# -- start functions and instantiation --------------------------------------------------------


async def test_a_start_function_that_traps_fails_vm_create_only(session) -> None:
    async with session() as (client, _):
        error = await refused(client, "vm.create", {"wat": wat("start_trap")}, code=-32003)
        assert error.data["trap_code"] == "unreachable"
        assert (await rpc(client, "sidecar.stats"))["vms"] == 0
        assert (await rpc(client, "vm.list"))["vms"] == []
        assert (await call(client, await new_vm(client, "numeric"), "add", 1, 2))["results"] == [3]


async def test_a_start_function_that_never_returns_is_bounded_by_the_timeout(session) -> None:
    async with session() as (client, _):
        warm = await new_vm(client, "numeric")  # a fresh process's first compile sets the compiler up (~0.2 s)
        await rpc(client, "vm.dispose", {"vm_id": warm})
        started = time.monotonic()
        params = {"wat": wat("start_spin"), "limits": {"vm_call_timeout_ms": TIMEOUT_MS}}
        error = await refused(client, "vm.create", params, code=-32004)
        # The bound covers compiling the module too, which is not charged to the guest.
        assert TIMEOUT_MS <= (time.monotonic() - started) * 1000 <= 1.3 * TIMEOUT_MS
        assert error.data["limit"] == "vm_call_timeout_ms" and error.data["capacity"] == TIMEOUT_MS
        assert (await rpc(client, "sidecar.stats"))["vms"] == 0
        assert await rpc(client, "ping") == {}


async def test_runner_vms_bounds_the_live_vms(session) -> None:
    async with session(env={"SIDECAR_RUNNER_VMS": "2"}) as (client, _):
        first = await new_vm(client, "numeric")
        await new_vm(client, "numeric")
        error = await refused(client, "vm.create", {"wat": wat("numeric")}, code=-32002)
        assert error.data["limit"] == "runner_vms" and error.data["env"] == "SIDECAR_RUNNER_VMS"
        assert error.data["capacity"] == 2 and error.data["observed"] == 3
        # failed creates hold no slot; a dispose frees one
        await refused(client, "vm.create", {"wat": wat("start_trap")}, code=-32002)
        assert await rpc(client, "vm.dispose", {"vm_id": first}) == {}
        third = await new_vm(client, "numeric")
        assert (await call(client, third, "add", 1, 1))["results"] == [2]


async def test_failed_creates_do_not_leak_slots() -> None:
    async with memory_session(env={"SIDECAR_RUNNER_VMS": "1"}) as (client, server):
        for _ in range(5):
            await refused(client, "vm.create", {"wat": wat("start_trap")}, code=-32003)
        vm_id = await new_vm(client, "numeric")
        assert (await call(client, vm_id, "add", 1, 1))["results"] == [2]


# -- stateless VMs: recycling thresholds ------------------------------------------------------


async def test_a_stateless_instance_is_replaced_after_its_call_budget(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "abi", mode="stateless", limits={"vm_recycle_after_calls": 3})
        counts = [(await call(client, vm_id, "count"))["results"][0] for _ in range(9)]
        assert max(counts) <= 3 and counts.count(1) >= 3, counts
        stateful = await new_vm(client, "abi", limits={"vm_recycle_after_calls": 3})  # never recycled
        assert [(await call(client, stateful, "count"))["results"][0] for _ in range(5)] == [1, 2, 3, 4, 5]


async def test_a_stateless_instance_is_replaced_once_its_memory_passes_the_threshold(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "faults", mode="stateless", limits={"vm_recycle_memory_bytes": "1 MiB"})
        assert (await call(client, vm_id, "grow", 20))["results"] == [1]  # 21 pages: past 1 MiB
        assert (await call(client, vm_id, "pages"))["results"] == [1]  # a fresh instance
        with_memory = await new_vm(client, "faults", limits={"vm_recycle_memory_bytes": "1 MiB"})
        assert (await call(client, with_memory, "grow", 20))["results"] == [1]
        assert (await call(client, with_memory, "pages"))["results"] == [21]  # stateful keeps it
        assert (await vm_info(client, with_memory))["memory_bytes"] == 21 * PAGE


async def test_a_stateless_vm_serves_on_after_traps_and_timeouts(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "abi", mode="stateless")
        await refused(client, "vm.call", {"vm_id": vm_id, "export": "trap"}, code=-32003)
        await refused(client, "vm.call", {"vm_id": vm_id, "export": "spin", "timeout_ms": 50}, code=-32004)
        assert (await call(client, vm_id, "echo", input="still here"))["output"] == "still here"
        assert (await vm_info(client, vm_id))["calls"] == 3


async def test_a_stateless_vm_runs_concurrent_calls_within_its_pool(session) -> None:
    async with session(env={"SIDECAR_VM_POOL_INSTANCES": "2"}) as (client, _):
        vm_id = await new_vm(client, "faults", mode="stateless")
        rounds = 300_000_000
        pending = [
            await client.start_request("vm.call", {"vm_id": vm_id, "export": "burn", "args": [rounds]})
            for _ in range(4)
        ]
        most = 0
        with anyio.fail_after(WAIT):
            answers = []
            for _, result in pending:
                most = max(most, (await vm_info(client, vm_id))["instances"])
                answers.append(await result())
        assert [answer["results"] for answer in answers] == [[rounds]] * 4
        assert 1 <= most <= 2
        assert (await vm_info(client, vm_id))["instances"] <= 2
