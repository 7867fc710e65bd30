"""VMs of one module share one linker (and its host functions): each call must still reach its
own VM's state. Through the real process: many VMs of one module call back at once, their host
calls waiting side by side and answered out of order, and each guest reads back only its own
input and its own answer, and counts only its own calls.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from .guests import call, output_bytes, rpc, wat
from .support import WAIT, process_session

pytestmark = pytest.mark.anyio

VMS = 8
ROUNDS = 3


async def test_vms_of_one_module_calling_back_at_once_each_reach_their_own_state() -> None:
    waiting: list[tuple[str, Any, anyio.Event]] = []
    pair_ready = anyio.Event()

    async def host(vm_id: str, method: str, params: Any) -> Any:
        assert method == "lookup"
        if len(waiting) < 2:  # the first two wait for each other: two guests inside host_call at once
            answered = anyio.Event()
            waiting.append((vm_id, params, answered))
            if len(waiting) == 2:
                pair_ready.set()
            with anyio.fail_after(WAIT):
                await answered.wait()
        return {"vm": vm_id, "asked": params}

    async def answer_the_pair_in_reverse() -> None:
        with anyio.fail_after(WAIT):
            await pair_ready.wait()
        for _, _, answered in reversed(waiting):
            answered.set()

    async with process_session(host_handler=host) as (client, _):
        module_id = (await rpc(client, "module.load", {"wat": wat("abi")}))["module_id"]
        vm_ids = [(await rpc(client, "vm.create", {"module_id": module_id}))["vm_id"] for _ in range(VMS)]
        answers: dict[tuple[str, int], bytes] = {}

        async def ask(vm_id: str, round_: int) -> None:
            asked = {"from": vm_id, "round": round_}
            answer = await call(client, vm_id, "ask", input=json.dumps(asked))
            answers[(vm_id, round_)] = output_bytes(answer)

        async def echo(vm_id: str, round_: int) -> None:
            text = f"{vm_id}/{round_}" * (round_ + 1)
            assert output_bytes(await call(client, vm_id, "echo", input=text)) == text.encode()

        with anyio.fail_after(WAIT * 3):
            async with anyio.create_task_group() as group:
                group.start_soon(answer_the_pair_in_reverse)
                for round_ in range(ROUNDS):
                    for vm_id in vm_ids:
                        group.start_soon(ask, vm_id, round_)
                        group.start_soon(echo, vm_id, round_)

        assert len(waiting) == 2 and waiting[0][0] != waiting[1][0]  # two VMs' host calls overlapped
        for (vm_id, round_), output in answers.items():
            assert json.loads(output) == {"vm": vm_id, "asked": {"from": vm_id, "round": round_}}
        for vm_id in vm_ids:  # each instance kept its own globals: `count` is 1 in every VM
            assert (await call(client, vm_id, "count"))["results"] == [1]
