"""Hibernation through the real process: VMs leave memory, wake on demand, and outlive the sidecar.

A hibernated VM keeps its id; any request naming it, or a host's answer to its pending async call,
wakes it with its state. With a state directory (`--state-dir` / `SIDECAR_STATE_DIR`) VMs survive
an orderly exit and a SIGKILL of a process that had hibernated them; the directory is one
process's at a time; a state file that fails validation is moved aside, never fatal. The resident
cap, the idle timer and the disk bound decide on their own which VMs hibernate.
"""

from __future__ import annotations

import json
import os
import re
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

from protocol.client import RemoteError, SidecarClient

from .guests import call, refused, rpc, vm_info
from .snapshot_support import KEEPER, SECRET, WAITER, ManualHost, answer, observe, until_result
from .support import WAIT

pytestmark = pytest.mark.anyio
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@asynccontextmanager
async def sidecar(state_dir: Path | None, log: Path, env: Mapping[str, str] | None = None,
                  host_handler: Any = None) -> AsyncIterator[SidecarClient]:
    """A sidecar process on `state_dir` (None: its private one), its log lines appended to `log`."""
    argv = [sys.executable, "-m", "sidecar", *(["--state-dir", str(state_dir)] if state_dir else [])]
    with log.open("ab") as stderr:
        async with SidecarClient.spawn(argv, env=env, host_handler=host_handler, stderr=stderr.fileno()) as client:
            yield client


def events(log: Path, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


async def hibernate(client: SidecarClient, vm_id: str) -> None:
    assert await rpc(client, "vm.hibernate", {"vm_id": vm_id}) == {}
    assert (await vm_info(client, vm_id))["resident"] is False


async def counter(client: SidecarClient, steps: int) -> str:
    """A VM of SECRET (its state only in an internal global and memory) counted up to `steps`."""
    vm_id = (await rpc(client, "vm.create", {"wat": SECRET}))["vm_id"]
    for _ in range(steps):
        await call(client, vm_id, "next")
    return vm_id


async def until(check: Any, within_s: float, every_s: float = 0.01) -> float:
    """Seconds until `await check()` is truthy, polled; fails past `within_s`."""
    started = time.monotonic()
    with anyio.fail_after(within_s):
        while not await check():
            await anyio.sleep(every_s)
    return time.monotonic() - started


async def test_a_hibernated_vm_wakes_on_its_next_call_with_its_state_and_id(tmp_path) -> None:
    async with sidecar(None, tmp_path / "log") as client:
        vm_id = (await rpc(client, "vm.create", {"wat": KEEPER}))["vm_id"]
        for n in (1, 2, 3):
            await call(client, vm_id, "step", n)
        await call(client, vm_id, "grow_hidden", 3)
        before = await observe(client, vm_id)
        info = await vm_info(client, vm_id)
        assert info["resident"] is True and RFC3339.match(info["last_used"])

        await hibernate(client, vm_id)
        info = await vm_info(client, vm_id)
        assert info["memory_bytes"] == 0 and info["instances"] == 0
        stats = await rpc(client, "sidecar.stats")
        assert stats["hibernations"] == 1 and stats["wakes"] == 0 and stats["state_bytes"] > 0

        assert await observe(client, vm_id) == before  # the first getter woke it
        assert (await vm_info(client, vm_id))["resident"] is True
        stats = await rpc(client, "sidecar.stats")
        assert stats["wakes"] == 1 and stats["state_bytes"] == 0  # a woken VM's file is gone
        assert (await call(client, vm_id, "starts"))["results"] == [1]  # its start function ran once in its life


async def test_a_host_answer_wakes_the_vm_waiting_on_it_and_is_delivered(tmp_path) -> None:
    async with sidecar(None, tmp_path / "log") as client:
        host = ManualHost(client)
        vm_id = (await rpc(client, "vm.create", {"wat": WAITER}))["vm_id"]
        assert (await call(client, vm_id, "ask", input='{"k": 1}'))["results"] == [0]
        sent = await host.next()
        await hibernate(client, vm_id)
        assert (await vm_info(client, vm_id))["host_calls_pending"] == 1

        await answer(client, sent["id"], {"v": "Ada"})
        await until(lambda: _wakes(client, 1), WAIT)
        await until_result(client, vm_id, "answers", 1)
        assert (await call(client, vm_id, "status"))["results"] == [0]
        assert (await vm_info(client, vm_id))["host_calls_pending"] == 0


async def _wakes(client: SidecarClient, count: int) -> bool:
    return (await rpc(client, "sidecar.stats"))["wakes"] >= count


async def test_concurrent_requests_to_a_sleeping_vm_wake_it_once(tmp_path) -> None:
    async with sidecar(None, tmp_path / "log") as client:
        vm_id = await counter(client, 5)
        await hibernate(client, vm_id)
        results: list[int] = []

        async def next_value() -> None:
            results.append((await call(client, vm_id, "next"))["results"][0])

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(next_value)
        assert sorted(results) == list(range(6, 14))  # every call saw the state, none was lost
        assert (await rpc(client, "sidecar.stats"))["wakes"] == 1


async def test_a_vm_disposed_while_hibernated_leaves_the_disk(tmp_path) -> None:
    state = tmp_path / "state"
    async with sidecar(state, tmp_path / "log") as client:
        vm_id = await counter(client, 2)
        await hibernate(client, vm_id)
        assert len(list((state / "vms").iterdir())) == 1 and len(list((state / "modules").iterdir())) == 1
        assert await rpc(client, "vm.dispose", {"vm_id": vm_id}) == {}
        assert list((state / "vms").iterdir()) == [] and list((state / "modules").iterdir()) == []
        assert (await rpc(client, "sidecar.stats"))["state_bytes"] == 0
        assert (await rpc(client, "vm.list"))["vms"] == []
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "next"}, code=-32001)
        assert error.data["vm_id"] == vm_id


async def test_vms_of_one_module_store_it_once(tmp_path) -> None:
    state = tmp_path / "state"
    async with sidecar(state, tmp_path / "log") as client:
        vm_ids = [await counter(client, n) for n in range(1, 4)]
        for vm_id in vm_ids:
            await hibernate(client, vm_id)
        assert len(list((state / "vms").iterdir())) == 3 and len(list((state / "modules").iterdir())) == 1
        sizes = sum(path.stat().st_size for path in state.glob("*/*") if path.parent.name in ("vms", "modules"))
        assert (await rpc(client, "sidecar.stats"))["state_bytes"] == sizes
        for n, vm_id in enumerate(vm_ids, start=1):
            assert (await call(client, vm_id, "stored"))["results"] == [n * 10]


async def test_an_orderly_exit_keeps_idle_vms_and_the_next_process_wakes_them_under_their_ids(tmp_path) -> None:
    state, log = tmp_path / "state", tmp_path / "log"
    async with sidecar(state, log) as client:
        counters = {await counter(client, n): n for n in (3, 7)}
        waiter = (await rpc(client, "vm.create", {"wat": WAITER}))["vm_id"]
        host = ManualHost(client)
        await call(client, waiter, "ask", input='{"k": 2}')
        pending_id = (await host.next())["id"]
        assert await rpc(client, "shutdown") == {}
    assert len(events(log, "vms_hibernated_at_exit")) == 1

    async with sidecar(state, log) as client:
        listed = {vm["vm_id"]: vm for vm in (await rpc(client, "vm.list"))["vms"]}
        assert set(listed) == {*counters, waiter}
        assert all(vm["resident"] is False and RFC3339.match(vm["last_used"]) for vm in listed.values())
        assert listed[waiter]["host_calls_pending"] == 1
        for vm_id, n in counters.items():
            assert (await call(client, vm_id, "next"))["results"] == [n + 1]
        await answer(client, pending_id, {"v": 3})  # the answer to the earlier process's call
        await until_result(client, waiter, "answers", 1)
        fresh = await counter(client, 0)
        assert fresh not in listed and int(fresh.removeprefix("vm-")) > max(int(v[3:]) for v in listed)


@pytest.mark.parametrize("ending", ["end_of_input", "sigterm"])
async def test_every_orderly_exit_hibernates_idle_vms_first(tmp_path, ending: str) -> None:
    state, log = tmp_path / "state", tmp_path / "log"
    async with sidecar(state, log) as client:
        vm_id = await counter(client, 4)
        assert client.process is not None
        if ending == "sigterm":
            client.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(WAIT):
                assert await client.process.wait() == 0
    [event] = events(log, "vms_hibernated_at_exit")
    assert event["vms"] == 1

    async with sidecar(state, log) as client:
        assert (await call(client, vm_id, "next"))["results"] == [5]


async def test_after_a_sigkill_every_hibernated_vm_comes_back_and_resident_ones_are_lost(tmp_path) -> None:
    state, log = tmp_path / "state", tmp_path / "log"
    async with sidecar(state, log) as client:
        kept = await counter(client, 4)
        await hibernate(client, kept)
        lost = await counter(client, 1)
        assert client.process is not None
        client.process.send_signal(signal.SIGKILL)
        with anyio.fail_after(WAIT):
            await client.process.wait()

    async with sidecar(state, log) as client:
        listed = [vm["vm_id"] for vm in (await rpc(client, "vm.list"))["vms"]]
        assert listed == [kept]
        assert (await call(client, kept, "next"))["results"] == [5]
        assert (await call(client, kept, "stored"))["results"] == [50]
        assert lost != kept


async def test_a_private_state_directory_left_by_a_killed_sidecar_is_removed_by_the_next(tmp_path) -> None:
    env = {"TMPDIR": str(tmp_path)}
    async with sidecar(None, tmp_path / "log", env) as client:
        await hibernate(client, await counter(client, 1))
        [orphan] = list(tmp_path.glob("wasm-sidecar-state-*"))
        assert client.process is not None
        client.process.send_signal(signal.SIGKILL)
        with anyio.fail_after(WAIT):
            await client.process.wait()
    assert orphan.exists()
    async with sidecar(None, tmp_path / "log", env) as client:
        await rpc(client, "vm.list")  # a VM method waits for the services, and so for the state directory
        [own] = list(tmp_path.glob("wasm-sidecar-state-*"))  # the live one's only
        assert own != orphan and not orphan.exists()
    assert not list(tmp_path.glob("wasm-sidecar-state-*"))  # an orderly exit removes its own


async def test_a_second_sidecar_on_a_locked_state_directory_exits_2_with_a_clear_error(tmp_path) -> None:
    state = tmp_path / "state"
    async with sidecar(state, tmp_path / "log") as client:
        await rpc(client, "ping")
        second = subprocess.run([sys.executable, "-m", "sidecar"], env={**os.environ, "SIDECAR_STATE_DIR": str(state)},
                                input=b"", capture_output=True, timeout=WAIT)
        assert second.returncode == 2
        line = json.loads(second.stderr.decode().strip().splitlines()[-1])
        assert line["event"] == "state_dir_unusable" and str(state) in line["error"]
        assert f"pid {client.process.pid}" in line["error"]  # type: ignore[union-attr]
        await rpc(client, "ping")  # the first one serves on


async def test_a_corrupted_state_file_is_quarantined_and_the_rest_wake(tmp_path) -> None:
    state, log = tmp_path / "state", tmp_path / "log"
    async with sidecar(state, log) as client:
        good, bad = await counter(client, 2), await counter(client, 3)
        await hibernate(client, good)
        await hibernate(client, bad)
    damaged = state / "vms" / f"{bad}.state"
    blob = bytearray(damaged.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    damaged.write_bytes(bytes(blob))

    async with sidecar(state, log) as client:
        assert [vm["vm_id"] for vm in (await rpc(client, "vm.list"))["vms"]] == [good]
        assert (await rpc(client, "sidecar.stats"))["state_quarantined"] == 1
        [moved] = list((state / "quarantine").iterdir())
        assert moved.name.startswith(f"{bad}.state") and moved.read_bytes() == bytes(blob)
        [event] = events(log, "state_quarantined")
        assert event["vm_id"] == bad and event["stage"] == "checksum"
        assert (await call(client, good, "next"))["results"] == [3]
        await refused(client, "vm.call", {"vm_id": bad, "export": "next"}, code=-32001)


async def test_a_state_file_damaged_while_its_vm_sleeps_is_quarantined_on_wake(tmp_path) -> None:
    state = tmp_path / "state"
    async with sidecar(state, tmp_path / "log") as client:
        vm_id = await counter(client, 2)
        await hibernate(client, vm_id)
        (state / "vms" / f"{vm_id}.state").write_bytes(b"not a snapshot")
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "next"}, code=-32006)
        assert error.data["vm_id"] == vm_id and error.data["stage"] == "format"
        assert (await rpc(client, "sidecar.stats"))["state_quarantined"] == 1
        await refused(client, "vm.call", {"vm_id": vm_id, "export": "next"}, code=-32001)  # the VM is gone
        assert (await call(client, await counter(client, 1), "next"))["results"] == [2]  # the sidecar serves on


async def test_an_idle_vm_hibernates_after_vm_hibernate_idle_ms(tmp_path) -> None:
    idle_ms = 400
    async with sidecar(None, tmp_path / "log", {"SIDECAR_VM_HIBERNATE_IDLE_MS": str(idle_ms)}) as client:
        vm_id = await counter(client, 1)
        used = time.monotonic()
        busy = await counter(client, 1)  # kept in use below: never idle long enough

        async def asleep() -> bool:
            await call(client, busy, "next")
            return not (await vm_info(client, vm_id))["resident"]

        await until(asleep, WAIT, every_s=idle_ms / 8000)
        elapsed = time.monotonic() - used
        assert idle_ms / 1000 <= elapsed <= 1.3 * idle_ms / 1000
        assert (await vm_info(client, busy))["resident"] is True
        assert (await call(client, vm_id, "next"))["results"] == [2]


async def test_past_the_resident_cap_the_least_recently_used_idle_vm_hibernates(tmp_path) -> None:
    async with sidecar(None, tmp_path / "log", {"SIDECAR_RUNNER_RESIDENT_VMS": "2"}) as client:
        first, second = await counter(client, 1), await counter(client, 2)
        await call(client, first, "next")  # now `second` is the least recently used
        third = await counter(client, 3)  # its request's thread makes room once the answer has gone
        await until(lambda: _hibernations(client, 1), WAIT)
        resident = {vm["vm_id"]: vm["resident"] for vm in (await rpc(client, "vm.list"))["vms"]}
        assert resident == {first: True, second: False, third: True}
        assert (await call(client, second, "next"))["results"] == [3]  # wakes; the watcher makes room again

        async def within_cap() -> bool:
            return sum(vm["resident"] for vm in (await rpc(client, "vm.list"))["vms"]) == 2

        await until(within_cap, WAIT)
        assert (await rpc(client, "sidecar.stats"))["hibernations"] == 2


async def _hibernations(client: SidecarClient, count: int) -> bool:
    return (await rpc(client, "sidecar.stats"))["hibernations"] >= count


async def test_past_runner_state_bytes_a_vm_stays_resident_and_the_limit_is_named(tmp_path) -> None:
    log = tmp_path / "log"
    async with sidecar(None, log, {"SIDECAR_RUNNER_STATE_BYTES": "1 KiB"}) as client:
        vm_id = await counter(client, 2)
        error = await refused(client, "vm.hibernate", {"vm_id": vm_id}, code=-32002)
        assert error.data["limit"] == "runner_state_bytes" and error.data["env"] == "SIDECAR_RUNNER_STATE_BYTES"
        assert (await vm_info(client, vm_id))["resident"] is True
        assert (await call(client, vm_id, "next"))["results"] == [3]
        assert (await rpc(client, "sidecar.stats"))["state_bytes"] == 0
    assert [event["limit"] for event in events(log, "limit_exhausted")] == ["runner_state_bytes"]


async def test_a_vm_the_disk_bound_refused_stays_resident_and_is_not_tried_again_until_used(tmp_path) -> None:
    log = tmp_path / "log"
    env = {"SIDECAR_RUNNER_STATE_BYTES": "1 KiB", "SIDECAR_RUNNER_RESIDENT_VMS": "1"}
    async with sidecar(None, log, env) as client:
        first = await counter(client, 1)
        second = await counter(client, 1)  # past the cap: `first` is refused by the disk bound

        async def refusals(count: int) -> bool:
            return len(events(log, "limit_exhausted")) >= count

        await until(lambda: refusals(1), WAIT)
        await counter(client, 1)  # past the cap again: only `second` is tried; `first` was not used since
        await until(lambda: refusals(2), WAIT)
        await rpc(client, "ping")
        assert [event["vm_id"] for event in events(log, "limit_exhausted")] == [first, second]
        assert all(vm["resident"] for vm in (await rpc(client, "vm.list"))["vms"])
        assert (await rpc(client, "sidecar.stats"))["hibernations"] == 0


async def test_a_stateless_vm_hibernates_by_dropping_its_warm_instances(tmp_path) -> None:
    async with sidecar(None, tmp_path / "log") as client:
        vm_id = (await rpc(client, "vm.create", {"wat": SECRET, "mode": "stateless"}))["vm_id"]
        await call(client, vm_id, "next")
        await hibernate(client, vm_id)
        assert (await vm_info(client, vm_id))["instances"] == 0
        assert (await call(client, vm_id, "next"))["results"] == [1]  # a fresh instance, as stateless VMs get
        assert (await vm_info(client, vm_id))["resident"] is True


async def test_vm_hibernate_names_an_unknown_vm(tmp_path) -> None:
    async with sidecar(None, tmp_path / "log") as client:
        error = await refused(client, "vm.hibernate", {"vm_id": "vm-404"}, code=-32001)
        assert error.data["vm_id"] == "vm-404"
        with pytest.raises(RemoteError):
            await rpc(client, "vm.hibernate", {})


async def test_a_python_session_hibernates_and_keeps_its_names(tmp_path, python_runtime) -> None:
    state = tmp_path / "state"
    async with sidecar(state, tmp_path / "log") as client:
        vm_id = (await rpc(client, "vm.create", {"runtime": "python"}))["vm_id"]
        await rpc(client, "vm.eval", {"vm_id": vm_id, "code": "import json\nnames = {'ada': 36}"})
        await hibernate(client, vm_id)
        assert not list((state / "modules").iterdir())  # the runtime's bake is named, never stored
        result = await rpc(client, "vm.eval", {"vm_id": vm_id, "code": "json.dumps(names)"})
        assert result["status"] == "ok" and result["value"] == repr('{"ada": 36}')
        await rpc(client, "vm.eval", {"vm_id": vm_id, "code": "names['eve'] = 41"})
    async with sidecar(state, tmp_path / "log") as client:  # the exit hibernated it; a new process wakes it
        result = await rpc(client, "vm.eval", {"vm_id": vm_id, "code": "sorted(names.items())"})
        assert result["value"] == repr([("ada", 36), ("eve", 41)])



@pytest.mark.parametrize("ending", ["shutdown", "end_of_input"])
def test_a_vm_whose_creation_was_answered_is_kept_by_an_exit_that_follows_at_once(tmp_path, ending: str) -> None:
    """The registry tells hibernation of a new VM before the host hears of it: an exit asked for the
    moment the answer arrives, and read by another thread (compiling a new module hands reading
    over), must find the VM to keep. Several processes, since each round is one exit."""
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "sidecar", "--state-dir", str(state)]
    created = []
    for round_ in range(6):
        module = SECRET.replace("(memory 1)", f"(memory 1) (global $round i32 (i32.const {round_}))")
        create = {"jsonrpc": "2.0", "id": 1, "method": "vm.create", "params": {"wat": module}}
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as made:
            assert made.stdin is not None and made.stdout is not None
            made.stdin.write(json.dumps(create).encode() + b"\n")
            made.stdin.flush()
            created.append(json.loads(made.stdout.readline())["result"]["vm_id"])
            if ending == "shutdown":
                made.stdin.write(b'{"jsonrpc":"2.0","id":2,"method":"shutdown"}\n')
            made.stdin.close()
            assert made.wait(WAIT) == 0
    kept = {path.name.removesuffix(".state") for path in (state / "vms").iterdir()}
    assert kept == set(created)
