"""`wasm-sidecar mcp` on hibernation, through the official MCP SDK client over the real process.

Idle sessions hibernate (the idle timer, the resident cap) and keep their names; with a state
directory (`--state-dir`) sessions come back by name after a restart, an orderly one or a SIGKILL
of a process that had hibernated them; the directory is one server's at a time; a damaged session
table is quarantined and the server starts with no session, leaving no VM behind on the disk.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from .mcp_support import mcp_command, mcp_env
from .support import WAIT

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("python_runtime")]


@asynccontextmanager
async def server(log: Path, state: Path | None = None, env: Mapping[str, str] | None = None) -> AsyncIterator[Client]:
    """An MCP host's connection to `wasm-sidecar mcp` on `state` (None: its private directory),
    its log lines appended to `log`."""
    command, *args = mcp_command()
    params = StdioServerParameters(command=command, args=[*args, *(["--state-dir", str(state)] if state else [])],
                                   env=mcp_env(env))
    with log.open("a") as errlog:
        # Every request, `initialize` included, is bounded by WAIT (the calls' task groups live in
        # the client, so the whole connection cannot sit in one cancel scope as in test_mcp_sdk).
        async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=WAIT) as client:
            yield client


async def run(client: Client, code: str, session: str) -> dict[str, Any]:
    with anyio.fail_after(WAIT):
        result = await client.call_tool("run_python", {"code": code, "session": session})
    return result.structured_content


async def sessions(client: Client) -> dict[str, dict[str, Any]]:
    with anyio.fail_after(WAIT):
        listed = await client.call_tool("list_sessions", {})
    return {row["session"]: row for row in listed.structured_content["sessions"]}


async def resident(client: Client) -> dict[str, bool]:
    return {name: row["resident"] for name, row in (await sessions(client)).items()}


def events(log: Path, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


async def kill(state: Path) -> None:
    """SIGKILL the server that holds `state` (its lock file names its pid; the SDK keeps the process
    to itself) and wait until it has died, so its lock is free."""
    pidfd = os.pidfd_open(int((state / "lock").read_text()))
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        readable, _, _ = await anyio.to_thread.run_sync(select.select, [pidfd], [], [], WAIT)  # readable: exited
        assert readable, f"the server did not die within {WAIT} s of SIGKILL"
    finally:
        os.close(pidfd)


async def test_a_session_idle_past_vm_hibernate_idle_ms_hibernates_and_keeps_its_names(tmp_path: Path) -> None:
    idle_ms = 1000
    async with server(tmp_path / "log", env={"SIDECAR_VM_HIBERNATE_IDLE_MS": str(idle_ms)}) as client:
        await run(client, "x = 1", "busy")  # kept in use below: never idle long enough
        await run(client, "names = {}", "idle")  # made (a VM's making is not its use)
        used = time.monotonic()  # before the call reaches the VM, so the idle time is at least the timer's
        await run(client, "names['ada'] = 36", "idle")

        async def awake() -> bool:
            await run(client, "x += 1", "busy")
            return (await resident(client))["idle"]

        with anyio.fail_after(WAIT):
            while await awake():
                await anyio.sleep(idle_ms / 8000)
        elapsed = time.monotonic() - used
        listed = await sessions(client)
        woken = await run(client, "names['eve'] = 41\nsorted(names.items())", "idle")
        after = await sessions(client)
    assert idle_ms / 1000 <= elapsed <= 1.5 * idle_ms / 1000  # the timer, plus writing an interpreter's state
    assert listed["idle"]["resident"] is False and listed["busy"]["resident"] is True
    assert listed["idle"]["memory_bytes"] == 0
    assert woken["value"] == repr([("ada", 36), ("eve", 41)])
    assert after["idle"]["resident"] is True and after["idle"]["calls"] == listed["idle"]["calls"] + 1
    assert after["idle"]["last_used"] > listed["idle"]["last_used"]  # RFC 3339 in UTC sorts as time


async def test_past_runner_resident_vms_the_least_recently_used_session_hibernates(tmp_path: Path) -> None:
    async with server(tmp_path / "log", env={"SIDECAR_RUNNER_RESIDENT_VMS": "1"}) as client:
        await run(client, "a = 'first'", "a")
        await run(client, "b = 'second'", "b")  # past the cap: `a` makes room
        with anyio.fail_after(WAIT):
            while (await resident(client)) != {"a": False, "b": True}:
                await anyio.sleep(0.01)
        first = await run(client, "a", "a")  # wakes `a`; `b` makes room
        with anyio.fail_after(WAIT):
            while (await resident(client)) != {"a": True, "b": False}:
                await anyio.sleep(0.01)
        second = await run(client, "b", "b")
    assert first["value"] == "'first'" and second["value"] == "'second'"


async def test_an_orderly_restart_brings_sessions_back_by_name(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "log"
    async with server(log, state) as client:
        await run(client, "import fractions\nx = fractions.Fraction(1, 3)", "work")
        await run(client, "y = 'scratch'", "scratch")
        await run(client, "z = 'gone'", "gone")
        await client.call_tool("reset_session", {"session": "gone"})
        with anyio.fail_after(WAIT):
            await client.call_tool("run_python", {"code": "1"})  # the session-less VM: nothing of it persists
        before = await sessions(client)
    [event] = events(log, "vms_hibernated_at_exit")
    assert event["vms"] == 2
    assert sorted(path.stem for path in (state / "vms").iterdir()) == sorted(row["vm_id"] for row in before.values())

    async with server(log, state) as client:
        listed = await sessions(client)
        work = await run(client, "x * 3", "work")
        scratch = await run(client, "y", "scratch")
        gone = await run(client, "z", "gone")
    assert set(listed) == {"work", "scratch"}
    assert all(listed[name]["vm_id"] == before[name]["vm_id"] for name in listed)
    assert all(row["resident"] is False for row in listed.values())  # each wakes on its first call
    assert work["value"] == "Fraction(1, 1)" and scratch["value"] == "'scratch'"
    assert gone["status"] == "error" and gone["error"]["type"] == "NameError"  # the reset held


async def test_after_a_sigkill_hibernated_sessions_come_back_and_resident_ones_are_forgotten(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "log"
    async with server(log, state, {"SIDECAR_RUNNER_RESIDENT_VMS": "1"}) as client:
        await run(client, "kept = [1, 2, 3]", "kept")
        await run(client, "lost = True", "lost")  # past the cap: `kept` hibernates
        with anyio.fail_after(WAIT):
            while (await resident(client)) != {"kept": False, "lost": True}:
                await anyio.sleep(0.01)
        await kill(state)

    async with server(log, state) as client:
        listed = await sessions(client)
        kept = await run(client, "sum(kept)", "kept")
        lost = await run(client, "lost", "lost")  # a new session under the old name
    assert list(listed) == ["kept"]
    assert kept["value"] == "6"
    assert lost["status"] == "error" and lost["error"]["type"] == "NameError"
    [forgotten] = events(log, "mcp_session_lost")
    assert forgotten["session"] == "lost"


async def test_a_second_server_on_a_locked_state_directory_exits_2_with_a_clear_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with server(tmp_path / "log", state) as client:
        await run(client, "x = 1", "s")
        second = subprocess.run([*mcp_command(), "--state-dir", str(state)], env=mcp_env(), input=b"",
                                capture_output=True, timeout=WAIT)
        goes_on = await run(client, "x + 1", "s")
    assert second.returncode == 2 and second.stdout == b""
    line = json.loads(second.stderr.decode().strip().splitlines()[-1])
    assert line["event"] == "state_dir_unusable" and str(state) in line["error"]
    assert "in use by another wasm-sidecar" in line["error"]
    assert goes_on["value"] == "2"


async def test_a_damaged_session_table_is_quarantined_and_its_vms_leave_the_disk(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "log"
    async with server(log, state) as client:
        await run(client, "x = 1", "s")
    assert len(list((state / "vms").iterdir())) == 1  # the exit hibernated the session
    (state / "mcp_sessions.json").write_text('{"format": 1, "sessions": {"s": 7}}')

    async with server(log, state) as client:
        listed = await sessions(client)
        fresh = await run(client, "x", "s")
        assert not list((state / "vms").iterdir())  # the VM no session names was removed, not registered
    assert listed == {}
    assert fresh["status"] == "error" and fresh["error"]["type"] == "NameError"
    [moved] = list((state / "quarantine").iterdir())
    assert moved.name.startswith("mcp_sessions.json.") and b'"s": 7' in moved.read_bytes()
    [event] = events(log, "state_quarantined")
    assert event["table"] == "mcp_sessions.json" and "not a session table" in event["error"]
    assert len(events(log, "state_vm_unclaimed")) == 1


async def test_a_session_whose_hibernated_state_is_damaged_is_lost_and_its_name_starts_afresh(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "log"
    async with server(log, state, {"SIDECAR_RUNNER_RESIDENT_VMS": "1"}) as client:
        await run(client, "x = 1", "damaged")
        await run(client, "y = 2", "other")  # past the cap: `damaged` hibernates
        with anyio.fail_after(WAIT):
            while (await resident(client)) != {"damaged": False, "other": True}:
                await anyio.sleep(0.01)
        vm_id = (await sessions(client))["damaged"]["vm_id"]
        (state / "vms" / f"{vm_id}.state").write_bytes(b"not a snapshot")
        lost = await run(client, "x", "damaged")
        listed = await sessions(client)
        afresh = await run(client, "x = 'new'\nx", "damaged")
        other = await run(client, "y", "other")
    assert lost["status"] == "failed" and lost["failure"]["session_lost"] is True
    assert "quarantined" in lost["failure"]["message"]
    assert set(listed) == {"other"}  # a session whose VM is gone is not listed
    assert afresh["value"] == "'new'" and other["value"] == "2"
    [event] = events(log, "state_quarantined")
    assert event["vm_id"] == vm_id


@pytest.mark.parametrize("first", ["daemon", "mcp"])
async def test_a_state_directory_serves_the_front_that_made_it_and_refuses_the_other(tmp_path: Path,
                                                                                      first: str) -> None:
    """The MCP front removes at start every VM no session names, which would be all of a daemon's:
    a directory keeps the front that made it, and the other front exits 2 leaving it untouched."""
    state = tmp_path / "state"
    daemon = [sys.executable, "-m", "sidecar", "--state-dir", str(state)]
    mcp = [*mcp_command(), "--state-dir", str(state)]
    if first == "daemon":
        with subprocess.Popen(daemon, env=mcp_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as made:
            assert made.stdin is not None and made.stdout is not None
            made.stdin.write(b'{"jsonrpc":"2.0","id":1,"method":"vm.create","params":{"wat":"(module (memory 1))"}}\n')
            made.stdin.flush()
            assert b'"vm_id"' in made.stdout.readline()
            made.stdin.close()  # end of input: the exit hibernates the VM
            assert made.wait(WAIT) == 0
    else:
        async with server(tmp_path / "log", state) as client:
            await run(client, "x = 1", "s")
    kept = sorted(path.name for path in (state / "vms").iterdir())
    assert kept  # the exit hibernated what the first front made
    other = subprocess.run(mcp if first == "daemon" else daemon, env=mcp_env(), input=b"",
                           capture_output=True, timeout=WAIT)
    assert other.returncode == 2 and other.stdout == b""
    line = json.loads(other.stderr.decode().strip().splitlines()[-1])
    assert line["event"] == "state_dir_unusable" and str(state) in line["error"]
    assert ("wasm-sidecar mcp" if first == "mcp" else "the daemon") in line["error"]
    assert sorted(path.name for path in (state / "vms").iterdir()) == kept
