"""`wasm-sidecar mcp` through the official MCP Python SDK (`mcp`, pinned in the test extra): the SDK
spawns the command over stdio as a host would, negotiates, lists the tools and calls them.

Fresh calls and sessions, a Python exception as a tool error, a timeout and the session cap named
in the tool error, a cancel from the client stopping the eval, and a server without the runtime.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPError

from .mcp_support import mcp_command, mcp_env
from .support import WAIT

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def connected(env: Mapping[str, str] | None = None) -> AsyncIterator[Client]:
    command, *args = mcp_command()
    server = StdioServerParameters(command=command, args=args, env=mcp_env(env))
    with anyio.fail_after(WAIT):
        async with Client(server) as client:  # default mode: probes `server/discover`, then `initialize`
            yield client


async def run(client: Client, code: str, **arguments: Any) -> Any:
    with anyio.fail_after(WAIT):
        return await client.call_tool("run_python", {"code": code, **arguments})


async def session_states(client: Client) -> list[str]:
    listed = await client.call_tool("list_sessions", {})
    return [row["state"] for row in listed.structured_content["sessions"]]


@pytest.mark.usefixtures("python_runtime")
async def test_a_host_negotiates_lists_the_tools_and_runs_fresh_code() -> None:
    async with connected() as client:
        assert client.protocol_version == "2025-11-25"
        assert client.server_info is not None and client.server_info.name == "wasm-sidecar"
        assert "not installed" not in (client.instructions or "")
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        first = await run(client, "import sys\nx = 6\nprint('out'); print('err', file=sys.stderr)\nx * 7")
        second = await run(client, "x")
    assert set(tools) == {"run_python", "reset_session", "list_sessions"}
    assert tools["run_python"].input_schema["required"] == ["code"]
    assert tools["run_python"].output_schema is not None
    assert first.is_error is False
    assert first.structured_content == {"status": "ok", "stdout": "out\n", "stderr": "err\n", "value": "42",
                                        "elapsed_ms": first.structured_content["elapsed_ms"]}
    [text] = first.content
    assert json.loads(text.text) == first.structured_content  # the same result, as text
    # Every session-less call is a fresh interpreter: nothing of the first is left.
    assert second.is_error is True and second.structured_content["error"]["type"] == "NameError"


@pytest.mark.usefixtures("python_runtime")
async def test_sessions_keep_names_across_calls_until_reset() -> None:
    async with connected() as client:
        await run(client, "import fractions\nx = 41", session="work")
        await run(client, "y = 'other'", session="scratch")
        kept = await run(client, "x + 1, fractions.Fraction(1, 2)", session="work")
        listed = await client.call_tool("list_sessions", {})
        reset = await client.call_tool("reset_session", {"session": "work"})
        again = await client.call_tool("reset_session", {"session": "work"})
        after = await run(client, "x", session="work")
        other = await run(client, "y", session="scratch")
    assert kept.structured_content["value"] == "(42, Fraction(1, 2))"
    assert kept.structured_content["session"] == "work"
    sessions = listed.structured_content["sessions"]
    assert [row["session"] for row in sessions] == ["scratch", "work"]
    assert all(row["state"] == "idle" and row["calls"] >= 1 for row in sessions)
    assert listed.structured_content["capacity"] == 32
    assert reset.structured_content == {"session": "work", "existed": True}
    assert again.structured_content == {"session": "work", "existed": False}
    assert after.is_error is True and after.structured_content["error"]["type"] == "NameError"
    assert other.structured_content["value"] == "'other'"


@pytest.mark.usefixtures("python_runtime")
async def test_an_exception_is_a_tool_error_with_its_traceback_not_a_protocol_error() -> None:
    async with connected() as client:
        result = await run(client, "def f():\n    return 1 / 0\nf()", session="s")
        goes_on = await run(client, "f.__name__", session="s")
    assert result.is_error is True
    error = result.structured_content["error"]
    assert error["type"] == "ZeroDivisionError" and "division by zero" in error["message"]
    assert "f()" in error["traceback"]
    assert goes_on.structured_content["value"] == "'f'"


@pytest.mark.usefixtures("python_runtime")
async def test_a_timeout_is_a_tool_error_that_names_the_limit_and_the_session_goes_on() -> None:
    async with connected() as client:
        await run(client, "x = 1", session="s")
        result = await run(client, "while True: pass", session="s", timeout_ms=200)
        after = await run(client, "'alive'", session="s")
    assert result.is_error is True
    failure = result.structured_content["failure"]
    assert failure["kind"] == "timeout" and failure["limit"] == "vm_call_timeout_ms"
    assert failure["env"] == "SIDECAR_VM_CALL_TIMEOUT_MS" and failure["capacity"] == 200
    assert failure["session_lost"] is True  # the interpreter stopped mid-way is replaced
    assert "vm_call_timeout_ms" in result.content[0].text
    assert after.structured_content["value"] == "'alive'"


@pytest.mark.usefixtures("python_runtime")
async def test_sessions_are_capped_by_runner_mcp_sessions() -> None:
    async with connected({"SIDECAR_RUNNER_MCP_SESSIONS": "2"}) as client:
        await run(client, "1", session="a")
        await run(client, "1", session="b")
        refused = await run(client, "1", session="c")
        await client.call_tool("reset_session", {"session": "a"})
        admitted = await run(client, "1", session="c")
    assert refused.is_error is True
    failure = refused.structured_content["failure"]
    assert failure["limit"] == "runner_mcp_sessions" and failure["env"] == "SIDECAR_RUNNER_MCP_SESSIONS"
    assert failure["capacity"] == 2 and failure["observed"] == 3
    assert admitted.is_error is False


@pytest.mark.usefixtures("python_runtime")
async def test_a_client_cancel_stops_the_eval() -> None:
    timeout_ms = 600_000  # only the cancel can stop the loop within the test's waits
    async with connected({"SIDECAR_VM_CALL_TIMEOUT_MS": str(timeout_ms)}) as client:
        await run(client, "0", session="s")
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(run, client, "while True: pass", session="s"))
            with anyio.fail_after(WAIT):  # until the loop runs: the session shows busy
                while (await session_states(client)) == ["idle"]:
                    await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()  # the SDK sends notifications/cancelled
        # The session runs one call at a time, so this answers only once the loop has stopped.
        after = await run(client, "'after'", session="s")
    assert after.structured_content["value"] == "'after'"


async def test_unknown_tools_are_protocol_errors_and_bad_arguments_tool_errors() -> None:
    async with connected() as client:
        with pytest.raises(MCPError) as unknown:
            await client.call_tool("rm_rf", {})
        bad = await client.call_tool("run_python", {"code": 7})
    assert unknown.value.error.code == -32602
    assert bad.is_error is True and "$.arguments.code" in bad.content[0].text


async def test_without_the_runtime_the_server_says_so_and_run_python_fails_clearly(tmp_path: Path) -> None:
    async with connected({"SIDECAR_DATA_DIR": str(tmp_path)}) as client:
        instructions = client.instructions or ""
        [run_python] = [tool for tool in (await client.list_tools()).tools if tool.name == "run_python"]
        result = await run(client, "1")
    assert "wasm-sidecar runtime install python" in instructions
    assert "wasm-sidecar runtime install python" in (run_python.description or "")
    assert result.is_error is True
    assert result.structured_content["failure"]["kind"] == "runtime_not_installed"


@pytest.mark.usefixtures("python_runtime")
async def test_host_calls_fail_inside_the_sandbox_without_reaching_the_client() -> None:
    async with connected() as client:
        result = await run(client, "import sidecar\ntry:\n    sidecar.host_call('fs.read', {})\n"
                                   "except sidecar.HostError as e:\n    print(e.code, e.message)")
    assert result.is_error is False
    assert result.structured_content["stdout"] == "-3 no host answers host calls under wasm-sidecar mcp\n"
