"""The wire contract, run over the in-memory transport and over a real subprocess alike."""

from __future__ import annotations

import json

import anyio
import pytest

from protocol.client import RemoteError, SidecarClient

from .guests import new_vm, rpc
from .support import WAIT

pytestmark = pytest.mark.anyio


async def next_frame(client: SidecarClient) -> object:
    with anyio.fail_after(WAIT):
        return await client.unsolicited.receive()


async def raw(client: SidecarClient, line: str | bytes) -> object:
    """Send one raw line and return the first frame that no request of the client matched."""
    await client.send_frame(line.encode() + b"\n" if isinstance(line, str) else line)
    return await next_frame(client)


async def test_ping_and_initialize(session) -> None:
    async with session() as (client, _):
        with anyio.fail_after(WAIT):
            assert await client.request("ping") == {}
            info = await client.request("initialize", {"protocol_version": 1, "client": {"name": "t", "version": "1"}})
        assert info["protocol_version"] == 1
        assert info["server"]["name"] == "wasm-sidecar"
        assert "ping" in info["capabilities"]["methods"]
        rows = {row["name"]: row for row in info["limits"]}
        assert rows["protocol_frame_bytes"]["value"] == 16 * 1024 * 1024
        assert rows["protocol_frame_bytes"]["class"] == "protocol"


async def test_capabilities_are_what_the_live_server_serves(session, tmp_path) -> None:
    """Every advertised method is routed, and every advertised snapshot format is written."""
    async with session() as (client, _):
        capabilities = (await rpc(client, "initialize"))["capabilities"]
        assert capabilities["guest_abi"] == 1
        assert sorted(capabilities["snapshot_formats"]) == ["state", "wasm"]
        for method in capabilities["methods"]:
            try:
                with anyio.fail_after(WAIT):
                    await client.request(method, {"unexpected": 1})
            except RemoteError as error:
                assert error.code != -32601, method
        vm_id = await new_vm(client, "abi")
        for fmt in capabilities["snapshot_formats"]:
            target = tmp_path / f"snapshot.{fmt}"
            written = await rpc(client, "vm.snapshot", {"vm_id": vm_id, "path": str(target), "format": fmt})
            assert written["size_bytes"] == target.stat().st_size > 0


async def test_limits_method_reports_env_overrides(session) -> None:
    async with session(env={"SIDECAR_PROTOCOL_COMPLETED_IDS": "77"}) as (client, _):
        with anyio.fail_after(WAIT):
            rows = {row["name"]: row for row in (await client.request("sidecar.limits"))["limits"]}
        assert rows["protocol_completed_ids"]["value"] == 77
        assert rows["protocol_completed_ids"]["source"] == "env"
        assert rows["protocol_frame_bytes"]["source"] == "default"


async def test_unknown_method_and_bad_params(session) -> None:
    async with session() as (client, _):
        with anyio.fail_after(WAIT):
            with pytest.raises(RemoteError) as caught:
                await client.request("no.such.method")
            assert caught.value.code == -32601 and caught.value.kind == "method_not_found"
            with pytest.raises(RemoteError) as caught:
                await client.request("$/cancelRequest", {"id": [1]})
            assert caught.value.code == -32602 and caught.value.data["path"] == "$.id"
            with pytest.raises(RemoteError) as caught:
                await client.request("ping", {"surprise": 1})
            assert caught.value.code == -32602
            assert await client.request("ping") == {}


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ('{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]', -32700),
        ('{"jsonrpc": "2.0", "method": 1, "params": "bar"}', -32600),
        ("[]", -32600),
        ('[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},{"jsonrpc": "2.0", "method"]', -32700),
        ("not json at all", -32700),
        ('{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}', -32600),
    ],
)
async def test_spec_errors_single_answer_with_null_id(session, line: str, code: int) -> None:
    async with session() as (client, _):
        frame = await raw(client, line)
        assert isinstance(frame, dict) and frame["id"] is None and frame["error"]["code"] == code
        assert "Traceback" not in json.dumps(frame)
        with anyio.fail_after(WAIT):
            assert await client.request("ping") == {}


async def test_spec_batches(session) -> None:
    async with session() as (client, _):
        frame = await raw(client, "[1,2,3]")
        assert isinstance(frame, list) and [f["error"]["code"] for f in frame] == [-32600] * 3
        mixed = (
            '[{"jsonrpc":"2.0","method":"ping","id":"1"},{"jsonrpc":"2.0","method":"ping"},'
            '{"jsonrpc":"2.0","method":"nope","id":"5"},{"foo":"boo"},{"jsonrpc":"2.0","method":"ping","id":"9"}]'
        )
        frame = await raw(client, mixed)
        by_id = {f["id"]: f for f in frame}
        assert len(frame) == 4
        assert by_id["1"]["result"] == {} and by_id["9"]["result"] == {}
        assert by_id["5"]["error"]["code"] == -32601 and by_id[None]["error"]["code"] == -32600
        # A batch of notifications gets no answer at all: the next frame is the ping's.
        await client.send_frame(b'[{"jsonrpc":"2.0","method":"ping"},{"jsonrpc":"2.0","method":"nope"}]\n')
        frame = await raw(client, '{"jsonrpc":"2.0","method":"ping","id":"after"}')
        assert frame == {"jsonrpc": "2.0", "id": "after", "result": {}}


async def test_notifications_are_never_answered(session) -> None:
    async with session() as (client, _):
        for line in [
            '{"jsonrpc":"2.0","method":"ping"}',
            '{"jsonrpc":"2.0","method":"unknown.method"}',
            '{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":"never-sent"}}',
            '{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":[1]}}',
        ]:
            await client.send_frame(line.encode() + b"\n")
        answer = await raw(client, '{"jsonrpc":"2.0","method":"ping","id":0}')
        assert answer == {"jsonrpc": "2.0", "id": 0, "result": {}}


async def test_oversized_frame_refused_and_sync_kept(session) -> None:
    async with session(env={"SIDECAR_PROTOCOL_FRAME_BYTES": "4KiB"}) as (client, _):
        big = '{"jsonrpc":"2.0","id":1,"method":"ping","params":{"pad":"' + "x" * 10000 + '"}}'
        frame = await raw(client, big)
        assert frame["id"] is None and frame["error"]["code"] == -32600
        data = frame["error"]["data"]
        assert data["limit"] == "protocol_frame_bytes" and data["env"] == "SIDECAR_PROTOCOL_FRAME_BYTES"
        assert data["capacity"] == 4096 and data["observed"] > 4096
        with anyio.fail_after(WAIT):
            assert await client.request("ping") == {}


async def test_responses_nobody_asked_for_are_dropped_and_counted(session) -> None:
    async with session() as (client, _):
        for line in [
            '{"jsonrpc":"2.0","id":"ghost.1","result":{}}',
            '{"jsonrpc":"2.0","id":42,"error":{"code":1,"message":"x"}}',
            '{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"x"}}',
        ]:
            await client.send_frame(line.encode() + b"\n")
        with anyio.fail_after(WAIT):
            stats = await client.request("sidecar.stats")
        assert stats["responses_dropped"] == {"unmatched": 3, "duplicate": 0, "stale": 0}
        assert stats["requests_in_flight"] == 0


async def test_pipelined_flood_every_request_answered_once(session) -> None:
    async with session() as (client, _):
        count = 3000
        lines = b"".join(b'{"jsonrpc":"2.0","method":"ping","id":%d}\n' % i for i in range(count))
        await client.send_frame(lines)
        seen = []
        with anyio.fail_after(WAIT):
            while len(seen) < count:
                seen.append((await client.unsolicited.receive())["id"])
        assert sorted(seen) == list(range(count))


async def test_shutdown_answers_then_ends_the_session(session) -> None:
    async with session() as (client, _):
        with anyio.fail_after(WAIT):
            assert await client.request("shutdown") == {}
            await client.closed.wait()
