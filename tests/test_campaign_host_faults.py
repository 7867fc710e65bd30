"""Host faults: answers that come late, twice, for ids never issued, in the wrong shape, for a
VM that is gone; and a host that goes away (end of input, SIGTERM) while guests run.

Everything runs through the real process. The host side is `ManualHost`: the test holds each
`host.call` and answers it by hand, so every fault is exact, and so are the `sidecar.stats`
`responses_dropped` counts each case must leave: `{stale, duplicate, unmatched}`, never more,
never less. Time bounds are relative to the configured limit.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from protocol.client import RemoteError, SidecarClient

from .campaign import assert_clean_logs, logged_session, raw_sidecar, well_formed
from .guests import new_vm, output_bytes, rpc, wat
from .snapshot_support import ManualHost, answer
from .support import WAIT

pytestmark = pytest.mark.anyio
HOST_CALL_TIMEOUT_MS = 400


async def drops(client: SidecarClient) -> dict[str, int]:
    """`responses_dropped` once every frame sent before has been handled (a ping goes after them)."""
    assert await rpc(client, "ping") == {}
    return (await rpc(client, "sidecar.stats"))["responses_dropped"]


def counts(stale: int = 0, duplicate: int = 0, unmatched: int = 0) -> dict[str, int]:
    return {"stale": stale, "duplicate": duplicate, "unmatched": unmatched}


def refusals(client: SidecarClient) -> list[dict[str, Any]]:
    """The frames the sidecar sent that answer nothing of ours: its -32600s to our bad answers."""
    frames = []
    while client.unsolicited.statistics().current_buffer_used:
        frames.append(client.unsolicited.receive_nowait())
    return frames


async def asking(client: SidecarClient, host: ManualHost, vm_id: str, params: str = "{}") -> tuple[Any, Any]:
    """Start `ask` (a blocking host_call) on `vm_id`: its result awaitable and the host.call id."""
    _, result = await client.start_request("vm.call", {"vm_id": vm_id, "export": "ask", "input": params})
    request = await host.next()
    assert request["method"] == "host.call" and request["params"]["vm_id"] == vm_id, request
    return result, request["id"]


async def test_a_late_answer_after_the_host_call_timed_out_is_stale(tmp_path: Path) -> None:
    env = {"SIDECAR_PROTOCOL_HOST_CALL_TIMEOUT_MS": str(HOST_CALL_TIMEOUT_MS)}
    async with logged_session(tmp_path, env) as client:
        host = ManualHost(client)
        vm_id = await new_vm(client, "abi")
        started = time.monotonic()
        result, request_id = await asking(client, host, vm_id)
        with anyio.fail_after(WAIT):
            timed_out = await result()
        elapsed = time.monotonic() - started
        assert timed_out["results"] == [-2], timed_out
        # One deadline: the guest hears -2 once the timeout passed, and by 1.3 times it.
        assert HOST_CALL_TIMEOUT_MS * 0.95 <= timed_out["elapsed_ms"] <= HOST_CALL_TIMEOUT_MS * 1.3, timed_out
        assert elapsed <= HOST_CALL_TIMEOUT_MS / 1000 * 1.3, elapsed
        await answer(client, request_id, {"late": 1})
        assert await drops(client) == counts(stale=1)
        await answer(client, request_id, {"later": 2})
        assert await drops(client) == counts(stale=2)
        assert (await rpc(client, "sidecar.stats"))["host_calls_pending"] == 0
        result, request_id = await asking(client, host, vm_id)  # the VM asks again and hears this time
        await answer(client, request_id, {"on": "time"})
        with anyio.fail_after(WAIT):
            assert json.loads(output_bytes(await result())) == {"on": "time"}
        assert await drops(client) == counts(stale=2)


async def test_duplicate_answers_are_dropped_and_the_first_one_counts(tmp_path: Path) -> None:
    async with logged_session(tmp_path) as client:
        host = ManualHost(client)
        vm_id = await new_vm(client, "abi")
        result, request_id = await asking(client, host, vm_id)
        frames = [{"jsonrpc": "2.0", "id": request_id, "result": {"n": n}} for n in (1, 2)]
        frames.append({"jsonrpc": "2.0", "id": request_id, "error": {"code": 5, "message": "third"}})
        await client.send_frame(b"".join(json.dumps(frame).encode() + b"\n" for frame in frames))
        with anyio.fail_after(WAIT):
            assert json.loads(output_bytes(await result())) == {"n": 1}
        assert await drops(client) == counts(duplicate=2)
        await client.send_frame(json.dumps([frames[1], frames[2]]).encode() + b"\n")  # in a batch too
        assert await drops(client) == counts(duplicate=4)
        assert refusals(client) == []


async def test_answers_to_ids_never_issued_are_unmatched(tmp_path: Path) -> None:
    async with logged_session(tmp_path) as client:
        host = ManualHost(client)
        vm_id = await new_vm(client, "abi")
        result, request_id = await asking(client, host, vm_id)
        token = request_id.rsplit(".", 1)[0]
        strangers = ["never", "", f"{token}.999999", f"{token}.0", f"{token}.x", "000000000000.1", 12345, -1,
                     2**70, f"{request_id} ", request_id.upper() + "Z"]
        for n, stranger in enumerate(strangers):
            await answer(client, stranger, {"wrong": n})
        await answer(client, strangers[0], error={"code": 1, "message": "not yours either"})
        assert await drops(client) == counts(unmatched=len(strangers) + 1)
        await answer(client, request_id, {"right": True})
        with anyio.fail_after(WAIT):
            assert json.loads(output_bytes(await result())) == {"right": True}
        assert await drops(client) == counts(unmatched=len(strangers) + 1)
        assert refusals(client) == []


BAD_IDS = [1.5, None, True, [0], {"id": 1}, 0]


@pytest.mark.parametrize("shape", ["result-and-error", "error-not-object", "error-null", "no-id",
                                   *(f"id-{json.dumps(bad)}" for bad in BAD_IDS)])
async def test_an_answer_of_the_wrong_shape_is_refused_or_dropped_and_never_misdelivered(tmp_path: Path,
                                                                                        shape: str) -> None:
    """Each wrong answer is accounted for exactly once: a -32600 back to the host, a count in
    `responses_dropped`, or (only for an error that is not an object) delivered to the guest
    as a host error. A well-formed answer afterwards then reaches the guest, or is a duplicate."""
    async with logged_session(tmp_path) as client:
        host = ManualHost(client)
        vm_id = await new_vm(client, "abi")
        result, request_id = await asking(client, host, vm_id)
        bad: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
        if shape == "result-and-error":
            bad |= {"result": {"both": 1}, "error": {"code": 1, "message": "both"}}
        elif shape == "error-not-object":
            bad |= {"error": "boom"}
        elif shape == "error-null":
            bad |= {"error": None}
        elif shape == "no-id":
            bad = {"jsonrpc": "2.0", "result": {"whose": "?"}}
        else:
            bad |= {"id": json.loads(shape.removeprefix("id-")), "result": {"wrong": "id"}}
        await client.send_frame(json.dumps(bad).encode() + b"\n")
        dropped = await drops(client)
        refused = refusals(client)
        assert all(well_formed(frame) and frame["error"]["code"] == -32600 for frame in refused), refused
        assert all(frame["id"] in (None, request_id) for frame in refused), refused
        delivered = False
        if shape.startswith("error-") and not refused and dropped == counts():
            delivered = True  # read loosely as a host error: the guest hears -1
        else:
            assert len(refused) + sum(dropped.values()) == 1, (refused, dropped)
            assert dropped in (counts(), counts(unmatched=1)), dropped
        await answer(client, request_id, {"proper": True})
        with anyio.fail_after(WAIT):
            heard = await result()
        if delivered:
            assert heard["results"] == [-1], heard
            assert await drops(client) == counts(duplicate=1)
        else:
            assert json.loads(output_bytes(heard)) == {"proper": True}, heard
            assert await drops(client) == dropped
        assert (await rpc(client, "sidecar.stats"))["host_calls_pending"] == 0


async def test_dispose_during_a_blocking_host_call_ends_the_call_and_the_late_answer_is_stale(tmp_path: Path) -> None:
    async with logged_session(tmp_path) as client:
        host = ManualHost(client)
        vm_ids = [await new_vm(client, "abi") for _ in range(2)]
        waiting = [await asking(client, host, vm_id) for vm_id in vm_ids]
        started = time.monotonic()
        assert await rpc(client, "vm.dispose", {"vm_id": vm_ids[0]}) == {}
        with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
            await waiting[0][0]()
        assert caught.value.code in (-32800, -32001), caught.value
        assert time.monotonic() - started < 1.0  # the disposed call ends now, not at a timeout
        await answer(client, waiting[0][1], {"too": "late"})
        assert await drops(client) == counts(stale=1)
        await answer(client, waiting[1][1], {"for": "the other"})  # the other VM's call is untouched
        with anyio.fail_after(WAIT):
            assert json.loads(output_bytes(await waiting[1][0]())) == {"for": "the other"}
        assert await drops(client) == counts(stale=1)
        stats = await rpc(client, "sidecar.stats")
        assert stats["host_calls_pending"] == 0 and stats["vms"] == 1


# -- the host goes away -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["end-of-input", "sigterm"])
async def test_the_host_going_away_during_runs_ends_the_process_promptly_and_cleanly(tmp_path: Path,
                                                                                     how: str) -> None:
    """A guest spinning and a guest blocked in host_call are in flight when the host closes the
    sidecar's input or signals it: exit 0 within the shutdown budget, each request answered
    -32800 exactly once (as `shutdown` ends them), and nothing but JSON lines on stdout."""
    shutdown_ms = 1000
    async with raw_sidecar(tmp_path, {"SIDECAR_PROTOCOL_SHUTDOWN_MS": str(shutdown_ms)}) as sidecar:
        spinner = (await sidecar.request("c1", "vm.create", {"wat": wat("faults")}))["result"]["vm_id"]
        asker = (await sidecar.request("c2", "vm.create", {"wat": wat("abi")}))["result"]["vm_id"]
        calls = [{"jsonrpc": "2.0", "id": "spin", "method": "vm.call", "params": {"vm_id": spinner, "export": "spin"}},
                 {"jsonrpc": "2.0", "id": "ask", "method": "vm.call",
                  "params": {"vm_id": asker, "export": "ask", "input": "{}"}},
                 {"jsonrpc": "2.0", "id": "list", "method": "vm.list"}]
        await sidecar.send(b"".join(json.dumps(frame).encode() + b"\n" for frame in calls))
        early = []
        with anyio.fail_after(WAIT):  # the host.call and the list; the list may show the spinner idle
            while not any(frame.get("method") == "host.call" for frame in early):
                early.append(json.loads(await sidecar.line()))
        started = time.monotonic()
        if how == "sigterm":
            sidecar.process.send_signal(signal.SIGTERM)
        else:
            sidecar.close_input()
        with anyio.fail_after(WAIT):
            rest = await sidecar.rest_of_output()
        code = await sidecar.exit_code()
        elapsed = time.monotonic() - started
        assert code == 0
        assert elapsed <= shutdown_ms / 1000 * 1.3, elapsed
        frames = early + [json.loads(line) for line in rest]  # every line is JSON, or this raises
        answers: dict[str, list[dict[str, Any]]] = {}
        for frame in frames:
            if "method" not in frame:
                assert well_formed(frame), frame
                answers.setdefault(frame["id"], []).append(frame)
        for request_id in ("spin", "ask"):  # ended as a shutdown ends them, each once
            assert [frame.get("error", {}).get("code") for frame in answers.get(request_id, [])] == [-32800], answers
        assert_clean_logs(sidecar.logs())
