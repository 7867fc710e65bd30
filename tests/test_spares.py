"""A VM may start from a spare instance made ahead for its module (`sidecar.spares`): through the
real process, nothing about a VM may show whether it did. Each VM of a module starts from fresh
state, with its own budgets, its own WASI view, and calls the host as itself; with spares turned
off (`SIDECAR_RUNNER_SPARE_INSTANCES=0`) every VM behaves the same.
"""

from __future__ import annotations

from typing import Any

import pytest

from .guests import call, rpc, wat
from .support import process_session

pytestmark = pytest.mark.anyio
PAGE = 65536
SPARES_OFF = {"SIDECAR_RUNNER_SPARE_INSTANCES": "0"}


@pytest.mark.parametrize("env", [{}, SPARES_OFF], ids=["spares", "no spares"])
async def test_each_vm_of_a_module_starts_afresh_with_its_own_budgets(env: dict[str, str]) -> None:
    async with process_session(env) as (client, _):
        module_id = (await rpc(client, "module.load", {"wat": wat("stateless_counter")}))["module_id"]
        spares = 0 if env else 1  # made by module.load, for the first vm.create
        assert (await rpc(client, "sidecar.stats"))["spare_instances"] == spares
        first = (await rpc(client, "vm.create", {"module_id": module_id}))["vm_id"]
        assert (await rpc(client, "sidecar.stats"))["spare_instances"] == spares  # taken, and made again
        for expected in (1, 2, 3):
            assert (await call(client, first, "count"))["results"] == [expected]
        assert (await call(client, first, "grow", 9))["results"] == [1]

        second = (await rpc(client, "vm.create", {"module_id": module_id}))["vm_id"]
        assert (await call(client, second, "count"))["results"] == [1]  # none of the first VM's state
        assert (await call(client, second, "grow", 0))["results"] == [1]  # nor its memory

        tight = (await rpc(client, "vm.create", {"module_id": module_id,
                                                 "limits": {"vm_memory_bytes": 2 * PAGE}}))["vm_id"]
        assert (await call(client, tight, "grow", 2))["results"] == [-1]  # its own budget, not the registry's
        assert (await call(client, tight, "grow", 1))["results"] == [1]

        after = (await rpc(client, "vm.create", {"module_id": module_id}))["vm_id"]
        assert (await call(client, after, "grow", 9))["results"] == [1]  # nor the tightened VM's budget
        assert (await call(client, after, "count"))["results"] == [1]
        assert len({first, second, tight, after}) == 4


@pytest.mark.parametrize("env", [{}, SPARES_OFF], ids=["spares", "no spares"])
async def test_each_vm_sees_its_own_wasi_view(env: dict[str, str]) -> None:
    async with process_session(env) as (client, _):
        module_id = (await rpc(client, "module.load", {"wat": wat("wasi_reactor")}))["module_id"]
        views: list[tuple[dict[str, Any] | None, int, int]] = [
            (None, 0, 0),
            ({"args": ["a", "b"], "env": {"K": "v"}}, 2, 1),
            (None, 0, 0),
            ({"args": ["only"]}, 1, 0),
        ]
        for view, argc, envc in views:
            params: dict[str, Any] = {"module_id": module_id} | ({"wasi": view} if view else {})
            vm_id = (await rpc(client, "vm.create", params))["vm_id"]
            assert (await call(client, vm_id, "argc"))["results"] == [argc], view
            assert (await call(client, vm_id, "envc"))["results"] == [envc], view


async def test_a_vm_made_after_another_was_disposed_calls_the_host_as_itself() -> None:
    asked: list[str] = []

    async def host(vm_id: str, method: str, params: Any) -> Any:
        asked.append(vm_id)
        return {"vm": vm_id}

    async with process_session(host_handler=host) as (client, _):
        module_id = (await rpc(client, "module.load", {"wat": wat("abi")}))["module_id"]
        vm_ids = []
        for _ in range(3):
            vm_id = (await rpc(client, "vm.create", {"module_id": module_id}))["vm_id"]
            answer = await call(client, vm_id, "ask", input="{}")
            assert answer["output"] == f'{{"vm":"{vm_id}"}}'
            await rpc(client, "vm.dispose", {"vm_id": vm_id})
            vm_ids.append(vm_id)
        assert asked == vm_ids and len(set(vm_ids)) == 3


async def test_a_module_with_a_start_function_gets_no_spare() -> None:
    """Its start function is guest code, which must run in the VM's own instance (it may call the host)."""
    started = """(module
      (global $started (mut i32) (i32.const 0))
      (func $start (global.set $started (i32.add (global.get $started) (i32.const 1))))
      (start $start)
      (func (export "started") (result i32) (global.get $started)))"""
    async with process_session() as (client, _):
        module_id = (await rpc(client, "module.load", {"wat": started}))["module_id"]
        for _ in range(2):
            vm_id = (await rpc(client, "vm.create", {"module_id": module_id}))["vm_id"]
            assert (await call(client, vm_id, "started"))["results"] == [1]
            assert (await rpc(client, "sidecar.stats"))["spare_instances"] == 0
