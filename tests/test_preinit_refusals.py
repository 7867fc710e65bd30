"""Pre-initializations that cannot be done, refused with a clear error; the sidecar serves on.

The export named must exist and take nothing (-32602 at `$.preinit.export`). A run that fails its
status, traps, calls `proc_exit`, or a module whose state cannot be captured, is -32005 with stage
`preinit`; a run past `runner_preinit_timeout_ms` is -32004 naming it; a guest budget is -32002; a
cancel ends the run at once and leaves nothing behind.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from protocol.client import RemoteError

from .guests import refused, rpc, wat
from .support import WAIT, process_session
from .test_cancel_builds import cancelled, until_stats

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("own_compile_cache")]
GUEST = wat("preinit", PAGES=4)
TIMEOUT_MS = 300  # long enough that the round trip around it is a small share of 1.3x
# A run that is not stopped by its cancel holds on to what it took this long.
UNSTOPPED = {"SIDECAR_RUNNER_PREINIT_TIMEOUT_MS": "5000"}
UNSNAPSHOTTABLE = """(module (table 1 funcref) (func $f) (elem declare func $f)
  (func (export "init") (table.set (i32.const 0) (ref.func $f))))"""


async def refused_both(client: Any, source: dict[str, Any], preinit: dict[str, Any], *, code: int) -> RemoteError:
    """`module.load` and `vm.create` refuse it alike; the sidecar still answers afterwards."""
    error = await refused(client, "module.load", {**source, "preinit": preinit}, code=code)
    again = await refused(client, "vm.create", {**source, "preinit": preinit}, code=code)
    assert again.data == error.data
    assert await rpc(client, "ping") == {}
    return error


@pytest.mark.parametrize(
    ("export", "reason"),
    [
        ("nope", "has no export"),
        ("takes", "takes (i32)"),
        ("gives", "returns (i64)"),
        ("memory", "not a function"),
        ("__sidecar_start", "belong to the sidecar"),
    ],
)
async def test_an_export_it_cannot_call_is_a_bad_param(session, export, reason) -> None:
    async with session() as (client, _):
        error = await refused_both(client, {"wat": GUEST}, {"export": export}, code=-32602)
    assert error.data["path"] == "$.preinit.export" and reason in error.message


async def test_a_failed_status_or_a_trap_is_the_modules_fault(session) -> None:
    async with session() as (client, _):
        failed = await refused_both(client, {"wat": GUEST}, {"export": "init_fails"}, code=-32005)
        trapped = await refused_both(client, {"wat": GUEST}, {"export": "init_traps"}, code=-32005)
        unbakeable = await refused_both(client, {"wat": UNSNAPSHOTTABLE}, {"export": "init"}, code=-32005)
    assert failed.data["stage"] == "preinit" and failed.data["status"] == 3 and failed.data["export"] == "init_fails"
    assert trapped.data["stage"] == "preinit" and trapped.data["trap_code"] == "unreachable"
    assert trapped.data["memory_bytes"] == 3 * 65536  # what the guest held when it trapped
    assert unbakeable.data["stage"] == "preinit" and "mutates a table" in unbakeable.data["reasons"][0]


async def test_a_wasi_guest_that_exits_or_fails_is_refused_with_its_stderr(session) -> None:
    async with session() as (client, _):
        source = {"wat": wat("preinit_wasi")}
        exited = await refused_both(client, source, {"export": "exits"}, code=-32005)
        no_file = await refused_both(client, source, {"export": "init"}, code=-32005)  # no preopen
    assert exited.data["stage"] == "preinit" and exited.data["exit_code"] == 7
    assert no_file.data["status"] == 8 and no_file.data["stderr"] == "no seed here\n"  # EBADF: no fd 3


async def test_a_preinit_past_its_time_is_a_timeout_naming_the_runner_limit(session) -> None:
    async with session(env={"SIDECAR_RUNNER_PREINIT_TIMEOUT_MS": str(TIMEOUT_MS)}) as (client, _):
        loaded = await rpc(client, "module.load", {"wat": GUEST})  # compiled now, not within the timing
        started = time.monotonic()
        spins = {"module_id": loaded["module_id"], "preinit": {"export": "init_spins"}}
        error = await refused(client, "vm.create", spins, code=-32004)
        assert TIMEOUT_MS <= (time.monotonic() - started) * 1000 <= 1.3 * TIMEOUT_MS
        assert error.data["limit"] == "runner_preinit_timeout_ms" and error.data["capacity"] == TIMEOUT_MS
        assert error.data["env"] == "SIDECAR_RUNNER_PREINIT_TIMEOUT_MS" and error.data["stage"] == "preinit"
        await refused(client, "module.load", {"wat": GUEST, "preinit": {"export": "init_spins"}}, code=-32004)
        # A guest's call budget does not bound the runner's work: this run takes longer than it.
        created = await rpc(client, "vm.create", {"wat": GUEST, "preinit": {"export": "init_burns"},
                                                  "limits": {"vm_call_timeout_ms": 1}})
        assert created["preinit_ms"] > 1


async def test_the_guest_memory_budget_caps_the_run_and_the_baked_module(session) -> None:
    small = {"vm_memory_bytes": "1 MiB"}
    async with session() as (client, _):
        # The grow past the budget fails in the guest, which says so with its status.
        error = await refused(client, "vm.create", {"wat": wat("preinit", PAGES=100), "limits": small,
                                                    "preinit": {"export": "init_grows"}}, code=-32005)
        assert error.data["status"] == 1 and error.data["memory_bytes"] == 65536
        # Within it, the bake holds the grown memory, which a VM with a smaller budget cannot take.
        fits = await rpc(client, "vm.create", {"wat": wat("preinit", PAGES=8), "limits": small,
                                               "preinit": {"export": "init_grows"}})
        error = await refused(client, "vm.create", {"module_id": fits["module_id"],
                                                    "limits": {"vm_memory_bytes": "512 KiB"}}, code=-32002)
        assert error.data["limit"] == "vm_memory_bytes" and error.data["observed"] == 9 * 65536
        # The declared memory is checked before any run, as for any module.
        error = await refused(client, "vm.create", {"wat": '(module (memory 20) (func (export "init")))',
                                                    "preinit": {"export": "init"}, "limits": small}, code=-32002)
        assert error.data["limit"] == "vm_memory_bytes" and error.data["observed"] == 20 * 65536


async def test_guest_budgets_that_bite_name_their_limit(session) -> None:
    async with session(env={"SIDECAR_VM_OUTPUT_BYTES": "4"}) as (client, _):
        error = await refused_both(client, {"wat": GUEST}, {"export": "init_writes"}, code=-32002)
    assert error.data["limit"] == "vm_output_bytes" and error.data["stage"] == "preinit"


async def test_what_the_preinit_names_must_exist(session, tmp_path) -> None:
    async with session() as (client, _):
        missing = {"wasi": {"preopens": [{"host_path": str(tmp_path / "nowhere"), "guest_path": "/x"}]}}
        error = await refused_both(client, {"wat": GUEST}, {"export": "init", **missing}, code=-32602)
        assert error.data["path"] == "$.preinit.wasi.preopens[0].host_path"
        unknown = {"module_id": "sha256:" + "0" * 64, "preinit": {"export": "init"}}
        assert (await refused(client, "vm.create", unknown, code=-32005)).data["stage"] == "unknown"
        await refused(client, "module.load", {"wat": GUEST, "preinit": {"export": ""}}, code=-32602)


async def test_a_cancelled_vm_create_stops_its_run_and_leaves_no_vm(session) -> None:
    """One VM slot: it comes free only once the cancelled run has stopped."""
    async with session(env={"SIDECAR_RUNNER_VMS": "1", **UNSTOPPED}) as (client, _):
        loaded = await rpc(client, "module.load", {"wat": GUEST})  # compiled: the run starts at once
        request_id, result = await client.start_request(
            "vm.create", {"module_id": loaded["module_id"], "preinit": {"export": "init_spins"}})
        await until_stats(client, vms_starting=1)
        started = time.monotonic()
        await cancelled(client, request_id, result)
        await until_stats(client, vms_starting=0, vms=0)
        assert (time.monotonic() - started) * 1000 < int(UNSTOPPED["SIDECAR_RUNNER_PREINIT_TIMEOUT_MS"]) / 2
        assert (await rpc(client, "vm.list"))["vms"] == []
        created = await rpc(client, "vm.create", {"wat": GUEST, "preinit": {"export": "init"}})
        assert [vm["vm_id"] for vm in (await rpc(client, "vm.list"))["vms"]] == [created["vm_id"]]


async def test_a_cancelled_module_load_stops_its_run(session) -> None:
    """One worker slot: the next load waits until the cancelled run has given it back."""
    async with session(env={"SIDECAR_RUNNER_WORKER_THREADS": "1", **UNSTOPPED}) as (client, _):
        await rpc(client, "module.load", {"wat": GUEST})  # compiled: the run starts at once
        spins = {"wat": GUEST, "preinit": {"export": "init_spins"}}
        request_id, result = await client.start_request("module.load", spins)
        await until_stats(client, requests_in_flight=1)
        started = time.monotonic()
        await cancelled(client, request_id, result)
        with anyio.fail_after(WAIT):
            loaded = await client.request("module.load", {"wat": GUEST, "preinit": {"export": "init"}})
        assert (time.monotonic() - started) * 1000 < int(UNSTOPPED["SIDECAR_RUNNER_PREINIT_TIMEOUT_MS"]) / 2
        assert loaded["preinit_cached"] is False


async def test_a_shutdown_stops_the_runs_in_flight() -> None:
    """The runs notice their stop at an epoch tick: the sidecar stops them before its ticker."""
    async with process_session(env=UNSTOPPED) as (client, _):
        await rpc(client, "module.load", {"wat": GUEST})
        for method in ("module.load", "vm.create"):
            await client.start_request(method, {"wat": GUEST, "preinit": {"export": "init_spins"}})
        await until_stats(client, requests_in_flight=2)
        process = client.process
        started = time.monotonic()
    assert process.returncode == 0
    assert time.monotonic() - started < 1.3 * 1.0  # protocol_shutdown_ms: 1 s
