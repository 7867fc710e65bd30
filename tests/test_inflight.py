"""Slow requests: their own tasks or worker threads, the in-flight bound, cancellation, host calls.

These reach into an in-memory server to give a method a slow handler: the VM methods that are
slow in production are exercised end to end in the VM tests.
"""

from __future__ import annotations

import threading

import anyio
import msgspec
import pytest

from protocol.client import HostError, RemoteError
from protocol.methods import VmCallParams
from sidecar.dispatcher import Reply
from sidecar.hostcalls import STATUS_HOST_ERROR, STATUS_OK, STATUS_REFUSED, STATUS_TIMEOUT

from .support import WAIT, memory_session

pytestmark = pytest.mark.anyio


async def test_slow_task_never_holds_up_cheap_requests_and_is_cancellable() -> None:
    started, never = anyio.Event(), anyio.Event()

    async def slow(params: VmCallParams) -> dict:
        started.set()
        await never.wait()
        return {"results": []}

    async with memory_session() as (client, server):
        server.dispatcher.route("vm.call", "task", slow)
        request_id, result = await client.start_request("vm.call", {"vm_id": "v", "export": "f"})
        with anyio.fail_after(WAIT):
            await started.wait()
            assert await client.request("ping") == {}
            assert (await client.request("sidecar.stats"))["requests_in_flight"] == 1
            await client.cancel(request_id)
            with pytest.raises(RemoteError) as caught:
                await result()
        assert caught.value.code == -32800 and caught.value.kind == "cancelled"
        with anyio.fail_after(WAIT):
            assert (await client.request("sidecar.stats"))["requests_in_flight"] == 0


async def test_worker_thread_answers_directly_and_cancel_reaches_it() -> None:
    """A deferred handler answers from its own thread; a cancel races it and exactly one answer wins."""
    stop = threading.Event()
    finished = threading.Event()

    def on_worker(params: VmCallParams, reply: Reply) -> None:
        def work() -> None:
            stop.wait(WAIT)
            reply.result({"results": [1]})  # too late: the cancel already answered
            finished.set()

        reply.on_cancel = stop.set
        threading.Thread(target=work).start()

    async with memory_session() as (client, server):
        server.dispatcher.route("vm.call", "deferred", on_worker)
        request_id, result = await client.start_request("vm.call", {"vm_id": "v", "export": "f"})
        await client.cancel(request_id)
        with anyio.fail_after(WAIT):
            with pytest.raises(RemoteError) as caught:
                await result()
            await anyio.to_thread.run_sync(finished.wait, WAIT)
            assert await client.request("ping") == {}
        assert caught.value.code == -32800
        assert client.unsolicited.statistics().current_buffer_used == 0  # no second answer


async def test_in_flight_bound_refuses_with_overloaded() -> None:
    release = anyio.Event()

    async def slow(params: VmCallParams) -> dict:
        await release.wait()
        return {"results": []}

    async with memory_session(env={"SIDECAR_PROTOCOL_REQUESTS_IN_FLIGHT": "2"}) as (client, server):
        server.dispatcher.route("vm.call", "task", slow)
        first = [await client.start_request("vm.call", {"vm_id": "v", "export": "f"}) for _ in range(2)]
        with anyio.fail_after(WAIT):
            with pytest.raises(RemoteError) as caught:
                await client.request("vm.call", {"vm_id": "v", "export": "f"})
            assert caught.value.code == -32008
            assert caught.value.data["limit"] == "protocol_requests_in_flight"
            assert caught.value.data["capacity"] == 2 and caught.value.data["observed"] == 3
            assert await client.request("ping") == {}  # inline work is not bounded by it
            release.set()
            for _, result in first:
                assert await result() == {"results": []}


async def test_a_handler_bug_costs_one_internal_error_not_the_daemon() -> None:
    def broken(params: VmCallParams, reply: Reply) -> None:
        raise ZeroDivisionError("bug")

    async with memory_session() as (client, server):
        server.dispatcher.route("vm.call", "deferred", broken)
        with anyio.fail_after(WAIT):
            with pytest.raises(RemoteError) as caught:
                await client.request("vm.call", {"vm_id": "v", "export": "f"})
            assert caught.value.code == -32603 and "Traceback" not in caught.value.message
            assert await client.request("ping") == {}


async def test_host_call_round_trip_and_host_errors() -> None:
    async def host(vm_id: str, method: str, params: object) -> object:
        if method == "fail":
            raise HostError(7, "no such thing", {"why": "test"})
        return {"vm": vm_id, "method": method, "echo": params}

    async with memory_session(host_handler=host) as (client, server):
        with anyio.fail_after(WAIT):
            answer = await anyio.to_thread.run_sync(
                server.hostcalls.call_blocking, "vm-1", "lookup", b'{"q": [1, 2]}', WAIT
            )
            assert answer.status == STATUS_OK
            assert answer.payload == b'{"vm":"vm-1","method":"lookup","echo":{"q":[1,2]}}'
            failed = await anyio.to_thread.run_sync(server.hostcalls.call_blocking, "vm-1", "fail", b"{}", WAIT)
        assert failed.status == STATUS_HOST_ERROR
        assert b'"code":7' in failed.payload and b'"why":"test"' in failed.payload


async def test_timeout_then_late_answer_is_stale_and_second_answer_duplicate() -> None:
    asked, answer_now = anyio.Event(), anyio.Event()

    async def slow_host(vm_id: str, method: str, params: object) -> object:
        asked.set()
        await answer_now.wait()
        return "late"

    async with memory_session(host_handler=slow_host) as (client, server):
        with anyio.fail_after(WAIT):
            issued: list[str] = []
            answer = await anyio.to_thread.run_sync(server.hostcalls.call_blocking, "vm-1", "slow", b"{}", 0.05,
                                                    issued.append)
            assert answer.status == STATUS_TIMEOUT
            answer_now.set()
            while server.hostcalls.dropped["stale"] == 0:
                await client.request("ping")  # each round trip lets the late answer arrive first
            stale_id = issued[0]
            await client.send_frame(b'{"jsonrpc":"2.0","id":"%s","result":1}\n' % stale_id.encode())
            stats = await client.request("sidecar.stats")
        assert stats["responses_dropped"] == {"stale": 2, "duplicate": 0, "unmatched": 0}


async def test_duplicate_answers_are_dropped_as_duplicate() -> None:
    async def host(vm_id: str, method: str, params: object) -> object:
        return 1

    async with memory_session(host_handler=host) as (client, server):
        with anyio.fail_after(WAIT):
            issued: list[str] = []
            await anyio.to_thread.run_sync(server.hostcalls.call_blocking, "vm-1", "m", b"{}", WAIT, issued.append)
            answered_id = issued[0]
            for _ in range(2):
                await client.send_frame(b'{"jsonrpc":"2.0","id":"%s","result":2}\n' % answered_id.encode())
            stats = await client.request("sidecar.stats")
        assert stats["responses_dropped"]["duplicate"] == 2


async def test_abandoning_a_vm_wakes_its_waiters_and_makes_answers_stale() -> None:
    asked, answer_now = anyio.Event(), anyio.Event()

    async def host(vm_id: str, method: str, params: object) -> object:
        asked.set()
        await answer_now.wait()
        return 1

    async with memory_session(host_handler=host) as (client, server):
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                answers = []

                async def wait_on_host() -> None:
                    call = server.hostcalls.call_blocking
                    answers.append(await anyio.to_thread.run_sync(call, "vm-gone", "m", b"{}", WAIT))

                tg.start_soon(wait_on_host)
                await asked.wait()
                assert server.hostcalls.abandon_owner("vm-gone", "VM disposed") == 1
            assert answers[0].status == STATUS_REFUSED and b"VM disposed" in answers[0].payload
            answer_now.set()
            while server.hostcalls.dropped["stale"] == 0:
                await client.request("ping")
            assert server.hostcalls.pending == 0


async def test_host_call_wait_is_bounded_by_the_protocol_limit() -> None:
    asked = anyio.Event()

    async def silent_host(vm_id: str, method: str, params: object) -> object:
        asked.set()
        await anyio.sleep_forever()

    async with memory_session(env={"SIDECAR_PROTOCOL_HOST_CALL_TIMEOUT_MS": "50"}, host_handler=silent_host) as (
        client,
        server,
    ):
        with anyio.fail_after(WAIT):
            answer = await anyio.to_thread.run_sync(server.hostcalls.call_blocking, "vm-1", "m", b"{}", WAIT)
        assert answer.status == STATUS_TIMEOUT and asked.is_set()
        assert server.hostcalls.pending == 0


def test_only_answers_to_async_calls_are_left_for_another_thread() -> None:
    """A thread waiting in `host_call` delivers cheap answers itself; an async call's answer runs
    the guest's `sidecar_on_response`, so it stays pending for another thread instead."""
    from protocol.decoding import IncomingResponse
    from sidecar.hostcalls import BlockingCall, HostCalls
    from sidecar.limits import load_limits

    hostcalls = HostCalls(load_limits({}), lambda frame: None)
    waiter = BlockingCall()
    blocking = hostcalls.issue("vm-1", "m", b"{}", waiter)
    heard: list[object] = []
    durable = hostcalls.issue("vm-1", "m", b"{}", heard.append)

    def answer(request_id: object) -> IncomingResponse:
        return IncomingResponse(request_id, msgspec.Raw(b"1"), None)

    assert hostcalls.deliver(answer(blocking), unless_guest=True) and waiter.answered()
    assert not hostcalls.deliver(answer(durable), unless_guest=True)
    assert not heard and hostcalls.is_pending(durable)  # untouched: the next reader delivers it
    for stray in ("never-issued", 7):
        assert hostcalls.deliver(answer(stray), unless_guest=True)
    assert hostcalls.dropped["unmatched"] == 2
