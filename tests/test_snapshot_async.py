"""Async host calls across snapshots: a VM waiting on the host moves to another process.

The guest's `host_call_async` returns a ticket and the VM goes idle; a snapshot carries the
pending call (its wire id, method and params) to a new process, whose host answers it there with
an ordinary response to the original id, and the answer reaches `sidecar_on_response`. Answers
that match nothing live are dropped by reason; the per-VM in-flight bound refuses with -3.
"""

from __future__ import annotations

import json

import pytest

from .guests import call, dropped, output_bytes, refused, rpc, vm_info
from .snapshot_support import WAITER, ManualHost, answer, restore, snapshot, until_result
from .support import process_session

pytestmark = pytest.mark.anyio
PARAMS = '{"key": "user:7", "n": [1, 2]}'
COMPACT = {"key": "user:7", "n": [1, 2]}


async def ask(client, vm_id: str, params: str = PARAMS) -> int:
    return (await call(client, vm_id, "ask", input=params))["results"][0]


async def test_a_pending_call_is_answered_in_the_process_it_was_restored_in(tmp_path) -> None:
    async with process_session() as (client, _):
        host = ManualHost(client)
        vm_id = (await rpc(client, "vm.create", {"wat": WAITER}))["vm_id"]
        assert await ask(client, vm_id) == 0
        sent = await host.next()
        assert sent["method"] == "host.call" and isinstance(sent["id"], str)
        assert sent["params"] == {"vm_id": vm_id, "method": "kv.get", "params": COMPACT}
        info = await vm_info(client, vm_id)
        assert info["state"] == "idle" and info["host_calls_pending"] == 1  # waiting, with no guest frames
        await snapshot(client, vm_id, tmp_path / "waiting.state")
    original_id = sent["id"]

    async with process_session() as (client, _):
        host = ManualHost(client)
        restored = await restore(client, tmp_path / "waiting.state")
        assert restored["pending_host_calls"] == [{"id": original_id, "method": "kv.get", "params": COMPACT}]
        vm_id = restored["vm_id"]
        assert (await vm_info(client, vm_id))["host_calls_pending"] == 1
        assert (await rpc(client, "sidecar.stats"))["host_calls_pending"] == 1
        assert host.waiting() == 0  # nothing is sent again: the host already has the request

        await answer(client, original_id, {"value": "Ada"})
        await until_result(client, vm_id, "answers", 1)
        assert (await call(client, vm_id, "ticket"))["results"] == [0]
        assert (await call(client, vm_id, "status"))["results"] == [0]
        assert output_bytes(await call(client, vm_id, "answer")) == b'{"value":"Ada"}'
        assert (await vm_info(client, vm_id))["host_calls_pending"] == 0

        await answer(client, original_id, {"value": "Eve"})  # the same id again
        stats = await dropped(client, "duplicate", 1)
        assert stats["responses_dropped"] == {"stale": 0, "duplicate": 1, "unmatched": 0}
        assert (await call(client, vm_id, "answers"))["results"] == [1]
        assert output_bytes(await call(client, vm_id, "answer")) == b'{"value":"Ada"}'

        # Tickets go on from the snapshot's; wire ids are this process's own.
        assert await ask(client, vm_id) == 1
        fresh = await host.next()
        assert fresh["id"] != original_id and fresh["id"].split(".")[0] != original_id.split(".")[0]
        await answer(client, fresh["id"], [1, 2, 3])
        await until_result(client, vm_id, "answers", 2)
        assert (await call(client, vm_id, "ticket"))["results"] == [1]
        assert output_bytes(await call(client, vm_id, "answer")) == b"[1,2,3]"


async def test_host_errors_and_results_reach_the_guest_after_a_restore(tmp_path) -> None:
    async with process_session() as (client, _):
        host = ManualHost(client)
        vm_id = (await rpc(client, "vm.create", {"wat": WAITER}))["vm_id"]
        tickets = [await ask(client, vm_id, json.dumps({"key": key})) for key in ("a", "b", "c")]
        ids = [(await host.next())["id"] for _ in tickets]
        await snapshot(client, vm_id, tmp_path / "three.state")
    assert tickets == [0, 1, 2]

    async with process_session() as (client, _):
        restored = await restore(client, tmp_path / "three.state")
        vm_id = restored["vm_id"]
        assert [call_["id"] for call_ in restored["pending_host_calls"]] == ids
        assert [call_["params"] for call_ in restored["pending_host_calls"]] == [{"key": k} for k in "abc"]
        # Answered out of order: each answer comes back under its own ticket.
        await answer(client, ids[1], error={"code": -5, "message": "no such key", "data": {"key": "b"}})
        await until_result(client, vm_id, "answers", 1)
        assert (await call(client, vm_id, "ticket"))["results"] == [1]
        assert (await call(client, vm_id, "status"))["results"] == [-1]
        error = json.loads(output_bytes(await call(client, vm_id, "answer")))
        assert error == {"code": -5, "message": "no such key", "data": {"key": "b"}}
        await answer(client, ids[2], "c-value")
        await until_result(client, vm_id, "answers", 2)
        assert (await call(client, vm_id, "ticket"))["results"] == [2]
        assert (await call(client, vm_id, "status"))["results"] == [0]
        await answer(client, ids[0], None)
        await until_result(client, vm_id, "answers", 3)
        assert output_bytes(await call(client, vm_id, "answer")) == b"null"
        assert (await call(client, vm_id, "tickets_sum"))["results"] == [1 + 2 + 3]  # each ticket once
        await answer(client, "not-ours.1", 0)
        await dropped(client, "unmatched", 1)


async def test_disposing_a_vm_makes_answers_to_its_pending_calls_stale(session, tmp_path) -> None:
    async with session() as (client, _):
        host = ManualHost(client)
        vm_id = (await rpc(client, "vm.create", {"wat": WAITER}))["vm_id"]
        await ask(client, vm_id)
        live_id = (await host.next())["id"]
        await snapshot(client, vm_id, tmp_path / "waiting.state")
        await rpc(client, "vm.dispose", {"vm_id": vm_id})
        assert (await rpc(client, "sidecar.stats"))["host_calls_pending"] == 0
        await answer(client, live_id, 1)
        await dropped(client, "stale", 1)

        # A restored call is as mortal: dispose the restored VM, and its answer is stale too.
        restored = await restore(client, tmp_path / "waiting.state")
        assert [c["id"] for c in restored["pending_host_calls"]] == [live_id]
        await rpc(client, "vm.dispose", {"vm_id": restored["vm_id"]})
        await answer(client, live_id, 2)
        stats = await dropped(client, "stale", 2)
        assert stats["responses_dropped"]["duplicate"] == 0 and stats["host_calls_pending"] == 0
        assert await rpc(client, "ping") == {}


@pytest.mark.parametrize("how", ["env", "vm.create"])
async def test_the_host_calls_in_flight_bound_refuses_the_next_call_with_minus_3(session, how) -> None:
    env = {"SIDECAR_VM_HOST_CALLS_IN_FLIGHT": "3"} if how == "env" else {}
    limits = {"limits": {"vm_host_calls_in_flight": 3}} if how == "vm.create" else {}
    async with session(env=env) as (client, _):
        host = ManualHost(client)
        vm_id = (await rpc(client, "vm.create", {"wat": WAITER, **limits}))["vm_id"]
        assert [await ask(client, vm_id) for _ in range(3)] == [0, 1, 2]
        assert await ask(client, vm_id) == -3
        assert await ask(client, vm_id) == -3
        ids = [(await host.next())["id"] for _ in range(3)]
        assert host.waiting() == 0  # a refused call never reaches the host
        assert (await vm_info(client, vm_id))["host_calls_pending"] == 3
        await answer(client, ids[1], "ok")
        await until_result(client, vm_id, "answers", 1)
        assert await ask(client, vm_id) == 3  # a slot is free again; refused calls used no ticket
        assert await ask(client, vm_id) == -3


async def test_restored_pending_calls_count_against_the_bound(tmp_path) -> None:
    async with process_session() as (client, _):
        ManualHost(client)
        vm_id = (await rpc(client, "vm.create", {"wat": WAITER}))["vm_id"]
        for _ in range(2):
            await ask(client, vm_id)
        await snapshot(client, vm_id, tmp_path / "two.state")
    async with process_session() as (client, _):
        ManualHost(client)
        vm_id = (await restore(client, tmp_path / "two.state", limits={"vm_host_calls_in_flight": 3}))["vm_id"]
        assert await ask(client, vm_id) == 2
        assert await ask(client, vm_id) == -3
        error = await refused(client, "vm.restore", {"path": str(tmp_path / "two.state"),
                                                     "limits": {"vm_host_calls_in_flight": 1}}, code=-32006)
        assert error.data["stage"] == "bounds"


async def test_a_restore_never_takes_a_live_vms_pending_call(session, tmp_path) -> None:
    """Restoring a snapshot in the process where its VM still waits on the same call id makes two
    VMs wait on one id. Today the restore silently re-registers the id to the copy: the original
    shows no pending call while its guest still waits and still holds an in-flight slot, so with
    a bound of 1 it can never make another async call. Refusing the restore, or leaving the
    live VM's call alone, would both be fine."""
    async with session(env={"SIDECAR_VM_HOST_CALLS_IN_FLIGHT": "1"}) as (client, _):
        host = ManualHost(client)
        original = (await rpc(client, "vm.create", {"wat": WAITER}))["vm_id"]
        await ask(client, original)
        await host.next()
        await snapshot(client, original, tmp_path / "waiting.state")
        try:
            await restore(client, tmp_path / "waiting.state")
        except Exception as exc:  # a refusal is a fine answer
            assert getattr(exc, "code", None) == -32006, exc
            return
        assert (await vm_info(client, original))["host_calls_pending"] == 1, "the restore took its call"
