"""`wasm-sidecar mcp` line by line: the handshake's revisions, what each revision changes, the
lifecycle's refusals, hostile frames, and a cancelled call that gets no response at all.

These speak raw JSON-RPC to the real process; `test_mcp_sdk.py` drives it through the official SDK.
"""

from __future__ import annotations

from typing import Any

import pytest

from .mcp_support import initialize, raw_mcp

pytestmark = pytest.mark.anyio


def call(request_id: int, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name}
    if arguments is not None:
        params["arguments"] = arguments
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


@pytest.mark.parametrize(("asked", "answered"), [
    ("2025-11-25", "2025-11-25"), ("2025-06-18", "2025-06-18"), ("2025-03-26", "2025-03-26"),
    ("2024-11-05", "2024-11-05"), ("2026-07-28", "2025-11-25"), ("1999-01-01", "2025-11-25"),
])  # fmt: skip
async def test_initialize_answers_the_revision_asked_for_or_its_newest(asked, answered) -> None:
    async with raw_mcp() as peer:
        result = (await peer.request(initialize(asked)))["result"]
    assert result["protocolVersion"] == answered
    assert result["capabilities"] == {"tools": {}}
    assert result["serverInfo"]["name"] == "wasm-sidecar"
    assert "run_python" in result["instructions"]


async def test_revisions_before_structured_output_get_text_only_and_argument_errors_as_protocol_errors() -> None:
    async with raw_mcp() as peer:
        await peer.request(initialize("2025-03-26"))
        await peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        tools = (await peer.request({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))["result"]["tools"]
        listed = (await peer.request(call(3, "list_sessions", {})))["result"]
        bad = (await peer.request(call(4, "reset_session", {"session": "no spaces allowed"})))["error"]
    assert {tool["name"] for tool in tools} == {"run_python", "reset_session", "list_sessions"}
    assert all("inputSchema" in tool and "outputSchema" not in tool for tool in tools)
    assert "structuredContent" not in listed and listed["content"][0]["type"] == "text"
    assert bad["code"] == -32602 and bad["data"]["path"] == "$.arguments.session"


async def test_newest_revision_reports_bad_arguments_as_a_tool_error_the_model_can_read() -> None:
    async with raw_mcp() as peer:
        await peer.request(initialize())
        result = (await peer.request(call(2, "run_python", {"code": "1", "colour": "red"})))["result"]
        missing = (await peer.request(call(3, "run_python")))["result"]
    assert result["isError"] is True and "colour" in result["content"][0]["text"]
    assert missing["isError"] is True and "code" in missing["content"][0]["text"]


async def test_unknown_tools_methods_and_lifecycle_mistakes_are_protocol_errors() -> None:
    async with raw_mcp() as peer:
        early = (await peer.request({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))["error"]
        discover = (await peer.request({"jsonrpc": "2.0", "id": 2, "method": "server/discover", "params": {}}))
        malformed = (await peer.request({"jsonrpc": "2.0", "id": 8, "method": "initialize",
                                         "params": {"protocolVersion": 2025, "clientInfo": {"name": "x"}}}))["error"]
        await peer.request(initialize(request_id=3))
        again = (await peer.request(initialize(request_id=4)))["error"]
        unknown = (await peer.request(call(5, "rm_rf", {})))["error"]
        daemon = (await peer.request({"jsonrpc": "2.0", "id": 6, "method": "vm.create", "params": {}}))["error"]
        ping = await peer.request({"jsonrpc": "2.0", "id": 7, "method": "ping", "params": {"_meta": {"x": 1}}})
    assert early["code"] == -32600 and early["data"]["missing"] == "initialize"
    assert discover["error"]["code"] == -32601  # how an SDK learns to fall back to `initialize`
    assert malformed["code"] == -32602 and malformed["data"]["path"] == "$.protocolVersion"
    assert again["code"] == -32600
    assert unknown["code"] == -32602 and unknown["data"]["path"] == "$.name"
    assert "run_python" in unknown["data"]["tools"]
    assert daemon["code"] == -32601  # the daemon's own methods are not served on this front
    assert ping == {"jsonrpc": "2.0", "id": 7, "result": {}}


async def test_hostile_frames_get_json_rpc_errors_and_serving_goes_on() -> None:
    async with raw_mcp({"SIDECAR_PROTOCOL_FRAME_BYTES": "4096"}) as peer:
        await peer.request(initialize())
        await peer.send(b"not json\n", b"[]\n", b'{"jsonrpc":"2.0","id":2,"method":7}\n', b"x" * 10_000 + b"\n",
                        b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"run_python",'
                        b'"arguments":{"code":"' + b"[" * 100_000 + b'"}}}\n')
        errors = [await peer.receive() for _ in range(5)]
        alive = await peer.request({"jsonrpc": "2.0", "id": 4, "method": "ping"})
    assert [error["error"]["code"] for error in errors] == [-32700, -32600, -32600, -32600, -32600]
    assert errors[4]["error"]["data"]["limit"] == "protocol_frame_bytes"
    assert alive["result"] == {}


@pytest.mark.usefixtures("python_runtime")
async def test_a_cancelled_call_stops_and_is_never_answered() -> None:
    async with raw_mcp({"SIDECAR_VM_CALL_TIMEOUT_MS": "600000"}) as peer:
        await peer.request(initialize())
        await peer.request(call(2, "run_python", {"code": "0", "session": "s"}))
        await peer.send(call(3, "run_python", {"code": "while True: pass", "session": "s"}),
                        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 3}},
                        call(4, "run_python", {"code": "'after'", "session": "s"}))
        # The session runs one call at a time: the third answers only once the loop has stopped,
        # which without the cancel would take vm_call_timeout_ms (ten minutes; the wait is seconds).
        answer = await peer.receive()
    assert answer["id"] == 4
    assert answer["result"]["structuredContent"]["value"] == "'after'"
