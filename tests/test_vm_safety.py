"""Guests calling the host, cancellation, parallel VMs, one call at a time per VM, and the
process-abort hazards of wasmtime (each run in a real subprocess, so an abort fails one test).

Guests that wait on the host are sequenced with events in the host handler; nothing sleeps.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import anyio
import pytest

from protocol.client import HostError, RemoteError

from .guests import (
    call,
    dropped,
    new_vm,
    output_bytes,
    refused,
    rpc,
    until_busy,
    vm_info,
    wat,
)
from .support import WAIT, process_session

pytestmark = pytest.mark.anyio


class GatedHost:
    """A host handler that records each `host.call` and answers only when the test says so."""

    def __init__(self, answer: Any = None) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.asked = anyio.Event()
        self.release = anyio.Event()
        self.answer = answer

    async def __call__(self, vm_id: str, method: str, params: Any) -> Any:
        self.calls.append((vm_id, method, params))
        self.asked.set()
        await self.release.wait()
        return self.answer if self.answer is not None else {"echo": params}

    async def wait_asked(self) -> None:
        with anyio.fail_after(WAIT):
            await self.asked.wait()


# -- host calls -------------------------------------------------------------------------------


async def test_a_host_call_round_trip(session) -> None:
    seen = []

    async def host(vm_id: str, method: str, params: Any) -> Any:
        seen.append((vm_id, method, params))
        return {"value": "Ada", "n": [1, 2.5, None], "uni": "✓"}

    async with session(host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi")
        answer = await call(client, vm_id, "ask", input='{"key": "user:7"}')
        assert seen == [(vm_id, "lookup", {"key": "user:7"})]
        body = output_bytes(answer)
        assert json.loads(body) == {"value": "Ada", "n": [1, 2.5, None], "uni": "✓"}
        assert answer["results"] == [len(body)]  # the status is the response's length
        assert b" " not in body  # compact JSON
        empty = await call(client, vm_id, "ask", input="")  # no params: the host sees null
        assert seen[-1] == (vm_id, "lookup", None) and empty["results"][0] > 0
        stats = await rpc(client, "sidecar.stats")
        assert stats["host_calls_pending"] == 0
        assert stats["responses_dropped"] == {"stale": 0, "duplicate": 0, "unmatched": 0}


async def test_answers_reach_the_guest_that_asked_even_out_of_order(session) -> None:
    both_asked, second_answered, waiting = anyio.Event(), anyio.Event(), []

    async def host(vm_id: str, method: str, params: Any) -> Any:
        waiting.append(vm_id)
        if len(waiting) == 2:
            both_asked.set()
        await both_asked.wait()
        if vm_id == waiting[0]:  # the first to ask hears last
            await second_answered.wait()
        answered.append(vm_id)
        second_answered.set()
        return {"for": vm_id, "asked": params}

    answered: list[str] = []
    async with session(host_handler=host) as (client, _):
        vms = [await new_vm(client, "abi") for _ in range(2)]
        pending = [
            await client.start_request("vm.call", {"vm_id": vm_id, "export": "ask", "input": json.dumps({"me": vm_id})})
            for vm_id in vms
        ]
        await client.send_frame(b'{"jsonrpc":"2.0","id":"forged.1","result":{"for":"nobody"}}\n')
        with anyio.fail_after(WAIT):
            outputs = [json.loads(output_bytes(await result())) for _, result in pending]
        assert outputs == [{"for": vm_id, "asked": {"me": vm_id}} for vm_id in vms]
        assert answered == waiting[::-1]
        stats = await rpc(client, "sidecar.stats")
        assert stats["responses_dropped"] == {"stale": 0, "duplicate": 0, "unmatched": 1}


async def test_a_host_error_reaches_the_guest_as_minus_one_with_the_error_json(session) -> None:
    async def host(vm_id: str, method: str, params: Any) -> Any:
        raise HostError(7, "no such key", {"key": params["key"]})

    async with session(host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi")
        answer = await call(client, vm_id, "ask", input='{"key": "k"}')
        assert answer["results"] == [-1]
        assert json.loads(output_bytes(answer)) == {"code": 7, "message": "no such key", "data": {"key": "k"}}


@pytest.mark.parametrize(
    "params",
    [b"{not json", b'{"k":"\xff"}', b'{"k":"\xc0\xaf"}', rb'{"k":"\ud800"}', b"[" * 5000 + b"]" * 5000],
    ids=["not-json", "not-utf8", "overlong", "lone-surrogate", "deep"],
)
async def test_params_that_are_not_json_are_refused_with_minus_three(session, params: bytes) -> None:
    """What reaches the wire must be JSON text: bytes that are not UTF-8, or nesting the decoder
    cannot follow, are refused in the guest's call and never reach the host (nor raise in it)."""
    host = GatedHost()
    async with session(host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi")
        answer = await call(client, vm_id, "ask", input_base64=base64.b64encode(params).decode())
        assert answer["results"] == [-3]
        assert json.loads(output_bytes(answer))["code"] == -3
        assert host.calls == []  # the host never heard of it
        assert (await rpc(client, "sidecar.stats"))["host_calls_pending"] == 0


HOST_CALL_TIMEOUT_MS = 400


async def test_a_host_that_does_not_answer_in_time_gives_minus_two_and_its_late_answer_is_stale(session) -> None:
    host = GatedHost()
    env = {"SIDECAR_PROTOCOL_HOST_CALL_TIMEOUT_MS": str(HOST_CALL_TIMEOUT_MS)}
    async with session(env=env, host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi")
        started = time.monotonic()
        answer = await call(client, vm_id, "ask", input='{"slow": true}')
        elapsed_ms = (time.monotonic() - started) * 1000
        assert answer["results"] == [-2]
        assert HOST_CALL_TIMEOUT_MS <= elapsed_ms <= 1.3 * HOST_CALL_TIMEOUT_MS  # one deadline, not two
        assert host.asked.is_set()
        host.release.set()  # the host answers now, too late
        stats = await dropped(client, "stale", 1)
        assert stats["responses_dropped"] == {"stale": 1, "duplicate": 0, "unmatched": 0}
        assert stats["host_calls_pending"] == 0
        assert (await call(client, vm_id, "count"))["results"] == [1]


async def test_the_call_deadline_bounds_a_wait_on_the_host(session) -> None:
    host = GatedHost()
    timeout_ms = 500
    async with session(host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi")
        started = time.monotonic()
        try:  # the guest hears a timeout (-2) when its time is up, or the whole call times out
            answer = await call(client, vm_id, "ask", input="{}", timeout_ms=timeout_ms)
            assert answer["results"] == [-2]
        except RemoteError as error:
            assert error.code == -32004 and error.data["capacity"] == timeout_ms
        assert (time.monotonic() - started) * 1000 <= 1.3 * timeout_ms
        host.release.set()
        await dropped(client, "stale", 1)
        assert (await call(client, vm_id, "count"))["results"] == [1]


async def test_dispose_while_the_guest_waits_on_the_host(session) -> None:
    host = GatedHost()
    async with session(host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi")
        request_id, result = await client.start_request("vm.call", {"vm_id": vm_id, "export": "ask_then_spin"})
        await host.wait_asked()
        info = await vm_info(client, vm_id)
        assert info["state"] == "busy" and info["host_calls_pending"] == 1
        assert (await rpc(client, "sidecar.stats"))["host_calls_pending"] == 1
        assert await rpc(client, "vm.dispose", {"vm_id": vm_id}) == {}
        with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
            await result()
        assert caught.value.code in (-32800, -32001), caught.value.data
        host.release.set()
        stats = await dropped(client, "stale", 1)
        assert stats["host_calls_pending"] == 0 and stats["vms"] == 0
        assert stats["responses_dropped"]["unmatched"] == 0


async def test_dispose_while_the_guest_waits_on_the_host_ends_the_call_with_an_error(session) -> None:
    """Even a guest that returns right after its host call must not answer for a VM that is gone.
    Repeated, because whether the guest returns before the next epoch tick is a race."""
    gates: list[GatedHost] = []

    async def host(vm_id: str, method: str, params: Any) -> Any:
        return await gates[-1](vm_id, method, params)

    async with session(host_handler=host) as (client, _):
        outcomes = []
        for attempt in range(1, 11):
            gates.append(GatedHost())
            vm_id = await new_vm(client, "abi")
            _, result = await client.start_request("vm.call", {"vm_id": vm_id, "export": "ask", "input": "{}"})
            await gates[-1].wait_asked()
            assert await rpc(client, "vm.dispose", {"vm_id": vm_id}) == {}
            try:
                with anyio.fail_after(WAIT):
                    outcomes.append(("answered", (await result())["results"]))
            except RemoteError as error:
                outcomes.append(("refused", error.code))
            gates[-1].release.set()
            await dropped(client, "stale", attempt)
        assert all(kind == "refused" for kind, _ in outcomes), outcomes


async def test_cancel_while_the_guest_waits_on_the_host(session) -> None:
    host = GatedHost()
    async with session(host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi")
        assert (await call(client, vm_id, "count"))["results"] == [1]
        request_id, result = await client.start_request("vm.call", {"vm_id": vm_id, "export": "ask_then_spin"})
        await host.wait_asked()
        await client.cancel(request_id)
        with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
            await result()
        assert caught.value.code == -32800 and caught.value.kind == "cancelled"
        host.release.set()
        await dropped(client, "stale", 1)
        assert (await call(client, vm_id, "count"))["results"] == [2]  # the VM serves on, state kept
        assert (await vm_info(client, vm_id))["host_calls_pending"] == 0


@pytest.mark.parametrize("where", ["env", "vm"])
async def test_host_call_payloads_are_bounded_by_vm_host_call_bytes(session, where) -> None:
    async def host(vm_id: str, method: str, params: Any) -> Any:
        return "z" * params["answer"]

    env = {"SIDECAR_VM_HOST_CALL_BYTES": "4096"} if where == "env" else {}
    limits = {"vm_host_call_bytes": 4096} if where == "vm" else None
    async with session(env=env, host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi", **({"limits": limits} if limits else {}))
        fits = await call(client, vm_id, "ask", input='{"answer": 4000}')
        assert fits["results"] == [4002]
        for params in ('{"answer": 5000}', '{"answer": 1, "pad": "%s"}' % ("p" * 5000)):
            answer = await call(client, vm_id, "ask", input=params)
            assert answer["results"] == [-3], (params[:20], answer["results"])
            refusal = json.loads(output_bytes(answer))
            assert refusal["limit"] == "vm_host_call_bytes" and refusal["env"] == "SIDECAR_VM_HOST_CALL_BYTES"
            assert refusal["capacity"] == 4096


# -- cancellation and deadlines of spinning guests --------------------------------------------


# A stop (cancel, dispose) reaches a running guest at its next deadline check: at most two epoch
# ticks away (the first check is armed two ticks out, later ones one). A long tick makes that the
# bound a test can hold the sidecar to.
TICK_MS = 100
STOP_WITHIN_MS = 2 * TICK_MS


async def test_cancel_stops_a_spinning_guest_promptly_and_the_next_call_works(session) -> None:
    async with session(env={"SIDECAR_RUNNER_EPOCH_TICK_MS": str(TICK_MS)}) as (client, _):
        vm_id = await new_vm(client, "abi")
        request_id, result = await client.start_request("vm.call", {"vm_id": vm_id, "export": "spin"})
        await until_busy(client, vm_id)
        started = time.monotonic()
        await client.cancel(request_id)
        with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
            await result()
        assert caught.value.code == -32800
        assert (time.monotonic() - started) * 1000 <= 1.3 * STOP_WITHIN_MS
        with anyio.fail_after(WAIT):
            while (await vm_info(client, vm_id))["state"] != "idle":  # the guest itself has stopped
                pass
        assert (await call(client, vm_id, "count"))["results"] == [1]
        assert (await rpc(client, "sidecar.stats"))["requests_in_flight"] == 0


async def test_cancelling_a_queued_call_means_it_never_runs(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "abi")
        spin_id, spin = await client.start_request("vm.call", {"vm_id": vm_id, "export": "spin", "timeout_ms": 5000})
        await until_busy(client, vm_id)
        queued_id, queued = await client.start_request("vm.call", {"vm_id": vm_id, "export": "count"})
        await client.cancel(queued_id)
        with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
            await queued()
        assert caught.value.code == -32800
        await client.cancel(spin_id)
        with anyio.fail_after(WAIT), pytest.raises(RemoteError):
            await spin()
        assert (await call(client, vm_id, "count"))["results"] == [1]  # the cancelled count never ran


# -- parallel VMs, one call at a time per VM --------------------------------------------------


async def test_two_busy_vms_run_at_once_and_a_third_is_served_meanwhile(session) -> None:
    rounds = 600_000_000  # about half a second of guest work on these machines
    async with session() as (client, _):
        first, second = await new_vm(client, "faults"), await new_vm(client, "faults")
        third = await new_vm(client, "numeric")
        pending = [
            await client.start_request("vm.call", {"vm_id": vm_id, "export": "burn", "args": [rounds]})
            for vm_id in (first, second)
        ]
        await until_busy(client, first, second)
        assert (await call(client, third, "add", 20, 22))["results"] == [42]
        states = {vm["vm_id"]: vm["state"] for vm in (await rpc(client, "vm.list"))["vms"]}
        served_while_busy = states[first] == states[second] == "busy"
        with anyio.fail_after(WAIT):
            answers = [await result() for _, result in pending]
        assert [answer["results"] for answer in answers] == [[rounds], [rounds]]
        assert served_while_busy, "the third VM's call waited for a busy guest"


async def test_two_spinning_vms_are_both_stopped_by_their_deadlines(session) -> None:
    async with session() as (client, _):
        vms = [await new_vm(client, "faults") for _ in range(2)]
        pending = [
            await client.start_request("vm.call", {"vm_id": vm_id, "export": "spin", "timeout_ms": 300})
            for vm_id in vms
        ]
        await until_busy(client, *vms)
        for _, result in pending:
            with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
                await result()
            assert caught.value.code == -32004
        for vm_id in vms:
            assert (await call(client, vm_id, "pages"))["results"] == [1]


async def test_calls_to_one_vm_never_overlap_and_run_in_order_of_arrival(session) -> None:
    """`exclusive` traps if it is entered while another call of the same VM is inside it; the
    first call waits on the host while the others arrive."""
    host = GatedHost()
    async with session(host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi")
        pending = [await client.start_request("vm.call", {"vm_id": vm_id, "export": "exclusive"})]
        await host.wait_asked()
        pending += [await client.start_request("vm.call", {"vm_id": vm_id, "export": "exclusive"}) for _ in range(9)]
        assert await rpc(client, "ping") == {}
        assert len(host.calls) == 1  # the others wait their turn outside the guest
        host.release.set()
        with anyio.fail_after(WAIT):
            results = [(await result())["results"][0] for _, result in pending]
        assert results == list(range(1, 11))
        assert len(host.calls) == 10


async def test_a_pipelined_burst_to_one_vm_is_answered_in_order(session) -> None:
    async with session() as (client, _):
        vm_id = await new_vm(client, "abi")
        pending = [await client.start_request("vm.call", {"vm_id": vm_id, "export": "count"}) for _ in range(200)]
        with anyio.fail_after(WAIT):
            results = [(await result())["results"][0] for _, result in pending]
        assert results == list(range(1, 201))
        assert (await vm_info(client, vm_id))["calls"] == 200


async def test_many_vms_called_at_once_each_keep_their_own_state(session) -> None:
    async with session() as (client, _):
        vms = [await new_vm(client, "abi") for _ in range(8)]
        pending = [
            (vm_id, await client.start_request("vm.call", {"vm_id": vm_id, "export": "count"}))
            for _ in range(5)
            for vm_id in vms
        ]
        counts: dict[str, list[int]] = {vm_id: [] for vm_id in vms}
        with anyio.fail_after(WAIT):
            for vm_id, (_, result) in pending:
                counts[vm_id].append((await result())["results"][0])
        assert all(values == [1, 2, 3, 4, 5] for values in counts.values()), counts


# -- wasmtime's process-abort hazards: only a subprocess can show an abort ---------------------


async def test_a_wasi_module_driven_by_vm_call_does_not_abort() -> None:
    async with process_session() as (client, _):
        vm_id = await new_vm(client, "wasi_reactor")
        hello = await call(client, vm_id, "hello")
        assert hello["results"] == [0]  # WASI errno success; its stdout is not the protocol's
        assert (await call(client, vm_id, "random"))["results"] == [0]
        assert (await call(client, vm_id, "add", 2, 3))["results"] == [5]
        assert await rpc(client, "ping") == {}
        assert client.unsolicited.statistics().current_buffer_used == 0  # nothing but answers on stdout
        assert client.process is not None and client.process.returncode is None


@pytest.mark.parametrize("mode", ["stateful", "stateless"])
async def test_a_wasi_reactor_driven_by_vm_call_sees_the_vms_wasi_view(session, tmp_path, mode: str) -> None:
    wasi = {"args": ["prog", "-v"], "env": {"A": "1", "B": "2", "C": "3"},
            "preopens": [{"host_path": str(tmp_path), "guest_path": "/data", "writable": False}]}
    async with session() as (client, _):
        vm_id = await new_vm(client, "wasi_reactor", wasi=wasi, mode=mode)
        bare = await new_vm(client, "wasi_reactor", mode=mode)
        for _ in range(2):  # and again on a stateless VM's warm instance
            assert (await call(client, vm_id, "argc"))["results"] == [2]
            assert (await call(client, vm_id, "envc"))["results"] == [3]
            assert (await call(client, vm_id, "preopen_errno"))["results"] == [0]
        assert (await call(client, bare, "argc"))["results"] == [0]
        assert (await call(client, bare, "preopen_errno"))["results"] == [8]  # EBADF: no preopen at fd 3


async def test_exports_of_v128_and_reference_types_are_listed_and_refused_without_aborting() -> None:
    async with process_session() as (client, _):
        loaded = await rpc(client, "module.load", {"wat": wat("refs")})
        exports = {item["name"]: item for item in loaded["exports"]}
        assert exports["takes_v128"]["params"] == ["v128"] and exports["gives_v128"]["results"] == ["v128"]
        assert len(exports["takes_funcref"]["params"]) == 1 and exports["takes_funcref"]["params"] != ["i32"]
        assert len(exports["takes_externref"]["params"]) == 1
        vm_id = (await rpc(client, "vm.create", {"module_id": loaded["module_id"]}))["vm_id"]
        for export in ("takes_v128", "gives_v128", "takes_funcref", "takes_externref", "gives_externref"):
            for args in ([], [1], [0.5]):
                params = {"vm_id": vm_id, "export": export, "args": args}
                error = await refused(client, "vm.call", params, code=-32602)
                assert error.data["path"].startswith("$.")
        assert (await call(client, vm_id, "plain"))["results"] == [4]
        assert client.process is not None and client.process.returncode is None


async def test_traps_and_bad_pointers_in_a_subprocess_leave_it_running() -> None:
    async def host(vm_id: str, method: str, params: Any) -> Any:
        return {"ok": True}

    async with process_session(host_handler=host) as (client, _):
        vm_id = await new_vm(client, "abi")
        for export in ("trap", "bad_input_read", "bad_output_write", "bad_host_call", "bad_response_read"):
            await refused(client, "vm.call", {"vm_id": vm_id, "export": export, "input": "x"}, code=-32003)
        faults = await new_vm(client, "faults")
        for export, args in (("recurse", [0]), ("load", [-1]), ("div", [1, 0])):
            await refused(client, "vm.call", {"vm_id": faults, "export": export, "args": args}, code=-32003)
        assert (await call(client, vm_id, "count"))["results"] == [1]
        assert client.process is not None and client.process.returncode is None


async def test_disposing_busy_vms_and_closing_the_session_exits_cleanly() -> None:
    async with process_session() as (client, _):
        vms = [await new_vm(client, "faults") for _ in range(2)]
        for vm_id in vms:
            await client.start_request("vm.call", {"vm_id": vm_id, "export": "spin"})
        await until_busy(client, *vms)
        assert await rpc(client, "vm.dispose", {"vm_id": vms[0]}) == {}
        process = client.process
    # the second VM was still spinning when stdin closed: the sidecar must stop it and exit 0
    assert process is not None and process.returncode == 0


async def test_dispose_stops_a_spinning_guest(session) -> None:
    async with session(env={"SIDECAR_RUNNER_EPOCH_TICK_MS": str(TICK_MS)}) as (client, _):
        vm_id = await new_vm(client, "faults")
        _, result = await client.start_request("vm.call", {"vm_id": vm_id, "export": "spin"})
        await until_busy(client, vm_id)
        started = time.monotonic()
        assert await rpc(client, "vm.dispose", {"vm_id": vm_id}) == {}
        with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
            await result()
        assert caught.value.code in (-32800, -32001)
        assert (time.monotonic() - started) * 1000 <= 1.3 * STOP_WITHIN_MS
        assert (await rpc(client, "vm.list"))["vms"] == []
        await refused(client, "vm.call", {"vm_id": vm_id, "export": "pages"}, code=-32001)
