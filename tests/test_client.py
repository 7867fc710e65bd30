"""The host client's waits, over a socket pair with a scripted sidecar on the other end.

Every way a wait can end must take its request out of the pending table, and every answer that
comes after must be counted by reason, never delivered. `statistics()` is the public view of both.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from protocol.client import ConnectionClosed, RemoteError, SidecarClient

from .support import WAIT

pytestmark = pytest.mark.anyio
NOTHING_DROPPED = {"unmatched": 0, "duplicate": 0, "stale": 0}


class ScriptedSidecar:
    """The far end of the pair: reads the client's frames and answers as the test says."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self._lines = BufferedByteReceiveStream(stream)

    async def next_request(self) -> dict[str, Any]:
        with anyio.fail_after(WAIT):
            return json.loads(await self._lines.receive_until(b"\n", 1 << 20))

    async def answer(self, request_id: Any, result: Any = None, **extra: Any) -> None:
        body = extra or {"result": result}
        await self.stream.send(json.dumps({"jsonrpc": "2.0", "id": request_id, **body}).encode() + b"\n")


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[SidecarClient, ScriptedSidecar]]:
    host_end, sidecar_end = socket.socketpair()
    async with (
        await anyio.abc.SocketStream.from_socket(host_end) as host_stream,
        await anyio.abc.SocketStream.from_socket(sidecar_end) as sidecar_stream,
        SidecarClient.attach(host_stream, host_stream) as client,
    ):
        yield client, ScriptedSidecar(sidecar_stream)


async def dropped_once(client: SidecarClient, reason: str) -> dict[str, Any]:
    """The next unsolicited frame, once it is counted as dropped for `reason`."""
    with anyio.fail_after(WAIT):
        frame = await client.unsolicited.receive()
    assert client.statistics().responses_dropped == {**NOTHING_DROPPED, reason: 1}
    return frame


async def sidecar_echoes(sidecar: ScriptedSidecar) -> None:
    request = await sidecar.next_request()
    await sidecar.answer(request["id"], request["params"])


async def test_an_answered_request_leaves_nothing_pending() -> None:
    async with connected() as (client, sidecar), anyio.create_task_group() as tg:
        tg.start_soon(sidecar_echoes, sidecar)
        with anyio.fail_after(WAIT):
            assert await client.request("echo", {"n": 1}) == {"n": 1}
        assert client.statistics().requests_pending == 0
        assert client.statistics().responses_dropped == NOTHING_DROPPED


async def test_an_error_answer_raises_remote_error() -> None:
    async with connected() as (client, sidecar):
        request_id, result = await client.start_request("vm.call")
        error = {"code": -32001, "message": "no such vm", "data": {"kind": "vm_not_found"}}
        await sidecar.answer((await sidecar.next_request())["id"], error=error)
        with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
            await result()
        assert (caught.value.code, caught.value.kind) == (-32001, "vm_not_found")
        assert client.statistics().requests_pending == 0


async def test_ids_are_the_correlators_strings() -> None:
    async with connected() as (client, sidecar):
        ids = [(await client.start_request("ping"))[0] for _ in range(3)]
        assert all(isinstance(i, str) for i in ids) and len(set(ids)) == 3
        assert [(await sidecar.next_request())["id"] for _ in ids] == ids


async def test_a_timed_out_wait_is_given_up_and_its_late_answer_is_stale() -> None:
    async with connected() as (client, sidecar):
        with anyio.fail_after(WAIT), pytest.raises(TimeoutError):
            await client.request("slow", timeout_s=0.01)  # nobody answers: it can only time out
        assert client.statistics().requests_pending == 0
        request = await sidecar.next_request()
        await sidecar.answer(request["id"], "late")
        assert (await dropped_once(client, "stale"))["result"] == "late"


async def test_a_request_cut_short_asks_the_sidecar_to_cancel_it() -> None:
    async with connected() as (client, sidecar):
        with anyio.fail_after(WAIT), pytest.raises(TimeoutError):
            await client.request("slow", timeout_s=0.01)
        request = await sidecar.next_request()
        cancel = await sidecar.next_request()
        assert cancel == {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": request["id"]}}


async def test_a_typed_result_ignores_fields_this_client_does_not_know() -> None:
    async def answer_with_more(sidecar: ScriptedSidecar) -> None:
        request = await sidecar.next_request()
        assert request["params"] == {"vm_id": "vm-1", "code": "1", "timeout_ms": 5}
        error = {"type": "E", "message": "m", "traceback": "t", "frames": 3}
        await sidecar.answer(request["id"], {"status": "error", "stdout": "", "stderr": "", "elapsed_ms": 1,
                                             "error": error, "cpu_ms": 0.5})

    async with connected() as (client, sidecar), anyio.create_task_group() as tg:
        tg.start_soon(answer_with_more, sidecar)
        with anyio.fail_after(WAIT):
            result = await client.eval("vm-1", "1", timeout_ms=5)
        assert (result.status, result.error.type, result.elapsed_ms) == ("error", "E", 1)


async def test_a_result_given_up_cannot_be_awaited_again() -> None:
    async with connected() as (client, _):
        _, result = await client.start_request("slow")
        with anyio.fail_after(WAIT), pytest.raises(TimeoutError):
            await result(timeout_s=0.01)
        with pytest.raises(RuntimeError, match="given up"):
            await result()


async def test_a_cancelled_wait_is_given_up_and_its_late_answer_is_stale() -> None:
    async with connected() as (client, sidecar):
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.request, "slow")
            request = await sidecar.next_request()  # sent, so its wait has begun
            assert client.statistics().requests_pending == 1
            tg.cancel_scope.cancel()
        assert client.statistics().requests_pending == 0
        await sidecar.answer(request["id"], "late")
        await dropped_once(client, "stale")


async def test_a_closed_connection_ends_every_wait() -> None:
    async with connected() as (client, sidecar):
        pending = [await client.start_request("slow") for _ in range(2)]
        await sidecar.stream.aclose()
        with anyio.fail_after(WAIT):
            for _, result in pending:
                with pytest.raises(ConnectionClosed):
                    await result()
            await client.closed.wait()
        assert client.statistics().requests_pending == 0


async def test_a_result_never_awaited_does_not_leak() -> None:
    async with connected() as (client, sidecar):
        await client.start_request("fire-and-forget")  # dropped at once: the request is given up
        assert client.statistics().requests_pending == 0
        await sidecar.answer((await sidecar.next_request())["id"], {})
        await dropped_once(client, "stale")


async def test_closing_a_result_gives_the_request_up() -> None:
    async with connected() as (client, _):
        _, result = await client.start_request("slow")
        assert client.statistics().requests_pending == 1
        result.close()
        assert client.statistics().requests_pending == 0


async def test_an_answer_nobody_awaits_is_delivered_and_leaves_the_table() -> None:
    async with connected() as (client, sidecar):
        _, result = await client.start_request("ping")
        await sidecar.answer((await sidecar.next_request())["id"], {})
        await sidecar.answer("marker.1", {})  # read after the answer: once it is here, so is the answer
        await dropped_once(client, "unmatched")
        assert client.statistics().requests_pending == 0
        with anyio.fail_after(WAIT):
            assert await result() == {}


async def test_a_second_answer_is_a_duplicate() -> None:
    async with connected() as (client, sidecar):
        _, result = await client.start_request("ping")
        request_id = (await sidecar.next_request())["id"]
        await sidecar.answer(request_id, "first")
        await sidecar.answer(request_id, "second")
        with anyio.fail_after(WAIT):
            assert await result() == "first"
        assert (await dropped_once(client, "duplicate"))["result"] == "second"


@pytest.mark.parametrize("foreign", ["nobody.1", 7, None])
async def test_an_answer_to_an_id_never_issued_is_unmatched(foreign: Any) -> None:
    async with connected() as (client, sidecar):
        await sidecar.answer(foreign, error={"code": -32600, "message": "bad"})
        assert (await dropped_once(client, "unmatched"))["id"] == foreign
