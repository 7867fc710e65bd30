"""vm.snapshot / vm.restore round trips of the `state` format, end to end.

Internal state (non-exported memories and mutable globals) must come back exactly, in the same
sidecar and in new processes, round after round; a start function runs once in a VM's life; a
64 MiB memory of zeros costs next to nothing; a restore takes the module from the compile cache
and keeps (or tightens) the VM's budgets.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from pathlib import Path

import pytest

from protocol.client import SidecarClient

from .guests import call, refused, rpc, vm_info
from .snapshot_support import KEEPER, SECRET, SPARSE, observe, read_state, restore, snapshot
from .support import process_session

pytestmark = pytest.mark.anyio
MiB = 1 << 20


class StartCounter:
    """The host side of the keeper's start function: counts the `started` calls per process."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def __call__(self, vm_id: str, method: str, params: object) -> dict:
        self.calls[method] += 1
        return {}


async def keeper_with_history(client: SidecarClient) -> str:
    """A keeper VM whose every piece of state has moved away from its initial value."""
    vm_id = (await rpc(client, "vm.create", {"wat": KEEPER}))["vm_id"]
    for n in (1, 2, 3):
        await call(client, vm_id, "step", n)
    assert (await call(client, vm_id, "grow_hidden", 3))["results"] == [3]
    return vm_id


async def test_hidden_globals_and_memory_survive_a_restore_in_the_same_sidecar(session, tmp_path) -> None:
    host = StartCounter()
    async with session(host_handler=host) as (client, _):
        original = await keeper_with_history(client)
        before = await observe(client, original)
        await snapshot(client, original, tmp_path / "keeper.state")
        await call(client, original, "step", 100)  # the original moves on; the file does not
        restored = await restore(client, tmp_path / "keeper.state")
        assert restored["pending_host_calls"] == []
        copy = restored["vm_id"]
        assert copy != original
        assert await observe(client, copy) == before
        assert (await vm_info(client, copy))["memory_bytes"] == (1 + 3) * 65536  # both memories

        # Two independent VMs from here on.
        assert (await call(client, copy, "step", 5))["results"] == [before["g_i32"] + 5]
        assert (await call(client, original, "g_i32"))["results"] == [before["g_i32"] + 100]
    assert host.calls == {"started": 1}  # vm.create ran the start function; the restore did not


async def test_hidden_globals_and_memory_survive_a_restore_in_a_new_process(tmp_path) -> None:
    first, second = StartCounter(), StartCounter()
    async with process_session(host_handler=first) as (client, _):
        vm_id = await keeper_with_history(client)
        before = await observe(client, vm_id)
        await snapshot(client, vm_id, tmp_path / "keeper.state")
    assert before["g_i64"] == -6_000_000_000_000 and before["g_f32"] == 1.5 and before["g_f64"] == -0.375
    assert before["hidden_pages"] == 3 and before["hidden_top"] == 0x5A5A0003
    async with process_session(host_handler=second) as (client, _):
        restored = (await restore(client, tmp_path / "keeper.state"))["vm_id"]
        assert await observe(client, restored) == before
        assert (await call(client, restored, "step", 1))["results"] == [before["g_i32"] + 1]
    assert first.calls == {"started": 1} and second.calls == {}


async def test_a_module_that_exports_none_of_its_state_resumes_in_a_new_process(tmp_path) -> None:
    async with process_session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": SECRET}))["vm_id"]
        for expected in (1, 2, 3):
            assert (await call(client, vm_id, "next"))["results"] == [expected]
        await snapshot(client, vm_id, tmp_path / "secret.state")
    async with process_session() as (client, _):
        vm_id = (await restore(client, tmp_path / "secret.state"))["vm_id"]
        assert (await call(client, vm_id, "stored"))["results"] == [30]
        assert (await call(client, vm_id, "next"))["results"] == [4]


async def test_state_round_trips_through_three_processes(tmp_path) -> None:
    host = StartCounter()
    async with process_session(host_handler=host) as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": KEEPER}))["vm_id"]
        await call(client, vm_id, "step", 2)
        first = await observe(client, vm_id)
        await snapshot(client, vm_id, tmp_path / "one.state")

    async with process_session(host_handler=host) as (client, _):
        vm_id = (await restore(client, tmp_path / "one.state"))["vm_id"]
        assert await observe(client, vm_id) == first
        await call(client, vm_id, "step", 40)
        await call(client, vm_id, "grow_hidden", 5)
        second = await observe(client, vm_id)
        await snapshot(client, vm_id, tmp_path / "two.state")

    assert second["g_i32"] == first["g_i32"] + 40 and second["hidden_load(4096)"] == 42
    assert second["hidden_pages"] == 5 and second["g_f64"] == first["g_f64"] - 0.125
    async with process_session(host_handler=host) as (client, _):
        vm_id = (await restore(client, tmp_path / "two.state"))["vm_id"]
        assert await observe(client, vm_id) == second
        await call(client, vm_id, "step", 1)
        third = await observe(client, vm_id)
    assert third["g_i32"] == second["g_i32"] + 1 and third["starts"] == 1
    assert host.calls == {"started": 1}  # across three processes, only the first vm.create


async def test_the_start_function_runs_once_at_create_and_never_at_restore(session, tmp_path) -> None:
    host = StartCounter()
    async with session(host_handler=host) as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": KEEPER}))["vm_id"]
        assert host.calls == {"started": 1}
        assert (await call(client, vm_id, "starts"))["results"] == [1]
        assert (await call(client, vm_id, "hidden_load", 0))["results"] == [1]
        await snapshot(client, vm_id, tmp_path / "keeper.state")
        for _ in range(2):
            copy = (await restore(client, tmp_path / "keeper.state"))["vm_id"]
            assert (await call(client, copy, "starts"))["results"] == [1]
            assert (await call(client, copy, "hidden_load", 0))["results"] == [1]
        assert host.calls == {"started": 1}
        # The start function is not an export a host can call, before or after a restore.
        await refused(client, "vm.call", {"vm_id": copy, "export": "__sidecar_start"}, code=-32602)


async def test_64_mib_of_mostly_zeros_is_a_small_file(tmp_path) -> None:
    guest = SPARSE.replace("PAGES", "1024")
    async with process_session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": guest}))["vm_id"]
        assert (await call(client, vm_id, "fill"))["results"] == [1024]
        await call(client, vm_id, "next")
        answer = await snapshot(client, vm_id, tmp_path / "big.state")
    assert answer["size_bytes"] < MiB
    image = read_state(tmp_path / "big.state").memories[0]
    assert image.size_bytes == 64 * MiB
    assert sum(len(data) for _, data in image.runs) <= 2 * 4096  # two non-zero chunks
    async with process_session() as (client, _):
        vm_id = (await restore(client, tmp_path / "big.state"))["vm_id"]
        assert (await call(client, vm_id, "tail"))["results"] == [0x600DCAFE]
        assert (await call(client, vm_id, "head"))["results"] == [0x0123456789ABCDEF]
        assert (await call(client, vm_id, "next"))["results"] == [2]
        assert (await vm_info(client, vm_id))["memory_bytes"] == 64 * MiB


# 4 MiB of memory: the first 2 MiB dense and one big run (written from linear memory as it lies,
# hashed on a thread beside the write), then every third 4 KiB chunk zero (small runs, gathered).
DENSE = """
(module
  (memory (export "memory") 64)
  (func (export "fill")
    (local $i i32)
    (loop $l
      (if (i32.or (i32.lt_u (local.get $i) (i32.const 0x200000))
                  (i32.rem_u (i32.shr_u (local.get $i) (i32.const 12)) (i32.const 3)))
        (then (i32.store (local.get $i) (i32.mul (i32.add (local.get $i) (i32.const 1)) (i32.const 0x9e3779b1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 0x400000)))))
  (func (export "digest") (result i64)
    (local $i i32) (local $h i64)
    (loop $l
      (local.set $h (i64.add (i64.mul (local.get $h) (i64.const 1099511628211)) (i64.load32_u (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 0x400000))))
    (local.get $h)))
"""


async def test_a_dense_memory_comes_back_exactly_and_snapshots_to_the_same_file(tmp_path) -> None:
    async with process_session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": DENSE}))["vm_id"]
        await call(client, vm_id, "fill")
        [digest] = (await call(client, vm_id, "digest"))["results"]
        answer = await snapshot(client, vm_id, tmp_path / "dense.state")
    assert answer["sha256"] == hashlib.sha256((tmp_path / "dense.state").read_bytes()).hexdigest()
    [image] = read_state(tmp_path / "dense.state").memories
    chunk, dense_end = 4096, 0x200000 // 4096  # chunk 512 is filled (512 % 3 == 2), 513 is not
    assert [offset // chunk for offset, _ in image.runs[:3]] == [0, dense_end + 2, dense_end + 5]
    assert len(image.runs[0][1]) == (dense_end + 1) * chunk
    async with process_session() as (client, _):
        vm_id = (await restore(client, tmp_path / "dense.state"))["vm_id"]
        assert (await call(client, vm_id, "digest"))["results"] == [digest]
        again = await snapshot(client, vm_id, tmp_path / "again.state")
    assert again["sha256"] == answer["sha256"] and again["size_bytes"] == answer["size_bytes"]


async def test_vm_list_counts_a_restored_vms_memory_before_its_first_call(session, tmp_path) -> None:
    guest = SPARSE.replace("PAGES", "16")
    async with session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": guest}))["vm_id"]
        await call(client, vm_id, "fill")
        await snapshot(client, vm_id, tmp_path / "one-mib.state")
        await rpc(client, "vm.dispose", {"vm_id": vm_id})
        restored = (await restore(client, tmp_path / "one-mib.state"))["vm_id"]
        assert (await vm_info(client, restored))["memory_bytes"] == 16 * 65536
        assert (await rpc(client, "sidecar.stats"))["vm_memory_bytes"] == 16 * 65536


async def test_a_restore_in_a_fresh_process_takes_the_module_from_the_compile_cache(tmp_path) -> None:
    # A module no earlier test compiled, so the first process really compiles it.
    guest = SECRET.replace("(memory 1)", f'(memory 1) (data (i32.const 8) "{uuid.uuid4().hex}")')
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with first_log.open("wb") as stderr:
        async with SidecarClient.spawn(stderr=stderr.fileno()) as client:
            vm_id = (await rpc(client, "vm.create", {"wat": guest}))["vm_id"]
            await call(client, vm_id, "next")
            await snapshot(client, vm_id, tmp_path / "secret.state")
    with second_log.open("wb") as stderr:
        async with SidecarClient.spawn(stderr=stderr.fileno()) as client:
            vm_id = (await restore(client, tmp_path / "secret.state"))["vm_id"]
            assert (await call(client, vm_id, "next"))["results"] == [2]
    compiled_first = [e for e in events(first_log) if e["event"] == "module_compiled"]
    compiled_second = [e for e in events(second_log) if e["event"] == "module_compiled"]
    assert [e["cached"] for e in compiled_first] == [False]
    assert [e["cached"] for e in compiled_second] == [True]
    assert compiled_second[0]["module_id"] == compiled_first[0]["module_id"]


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


# -- budgets across a restore -----------------------------------------------------------------


async def test_a_restore_keeps_the_vms_own_budgets_and_may_tighten_them(tmp_path) -> None:
    guest = SPARSE.replace("PAGES", "2")
    async with process_session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": guest, "limits": {"vm_memory_bytes": "8 MiB"}}))["vm_id"]
        await call(client, vm_id, "fill")
        await snapshot(client, vm_id, tmp_path / "small.state")
    assert read_state(tmp_path / "small.state").limits == {"vm_memory_bytes": 8 * MiB}
    async with process_session() as (client, _):
        kept = (await restore(client, tmp_path / "small.state"))["vm_id"]
        assert (await call(client, kept, "grow", 127))["results"] == [-1]  # 129 pages > 8 MiB
        assert (await call(client, kept, "grow", 100))["results"] == [2]
        tighter = (await restore(client, tmp_path / "small.state", limits={"vm_memory_bytes": "1 MiB"}))["vm_id"]
        assert (await call(client, tighter, "grow", 15))["results"] == [-1]  # 17 pages > 1 MiB
        assert (await call(client, tighter, "grow", 14))["results"] == [2]
        assert (await call(client, tighter, "tail"))["results"] == [0]  # the grown page is fresh
        # A budget above the sidecar's ceiling is refused as at vm.create.
        error = await refused(client, "vm.restore", {"path": str(tmp_path / "small.state"),
                                                     "limits": {"vm_memory_bytes": "1 GiB"}}, code=-32002)
        assert error.data["limit"] == "vm_memory_bytes"


async def test_a_restore_refuses_memory_larger_than_the_vms_memory_budget(tmp_path) -> None:
    guest = SPARSE.replace("PAGES", "64")  # 4 MiB
    async with process_session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": guest}))["vm_id"]
        await call(client, vm_id, "fill")
        await snapshot(client, vm_id, tmp_path / "four.state")
    async with process_session() as (client, _):
        error = await refused(client, "vm.restore", {"path": str(tmp_path / "four.state"),
                                                     "limits": {"vm_memory_bytes": "2 MiB"}}, code=-32006)
        assert error.data["stage"] == "bounds" and error.data["limit"] == "vm_memory_bytes"
        assert error.data["observed"] == 4 * MiB and error.data["capacity"] == 2 * MiB
        assert (await rpc(client, "vm.list"))["vms"] == []  # nothing half-restored is left behind
        fits = (await restore(client, tmp_path / "four.state", limits={"vm_memory_bytes": "4 MiB"}))["vm_id"]
        assert (await call(client, fits, "tail"))["results"] == [0x600DCAFE]
    async with process_session(env={"SIDECAR_VM_MEMORY_BYTES": str(2 * MiB)}) as (client, _):
        error = await refused(client, "vm.restore", {"path": str(tmp_path / "four.state")}, code=-32006)
        assert error.data["stage"] == "bounds" and error.data["limit"] == "vm_memory_bytes"
        assert await rpc(client, "ping") == {}


async def test_snapshot_files_are_written_atomically_and_report_their_digest(session, tmp_path) -> None:
    async with session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": SECRET}))["vm_id"]
        target = tmp_path / "deep" / "er" / "secret.state"
        answer = await snapshot(client, vm_id, target)
        assert answer["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
        assert sorted(p.name for p in target.parent.iterdir()) == ["secret.state"]  # no temporary left
        # An unwritable path is the host's mistake: -32602 naming the field, and the VM lives on.
        (tmp_path / "file").write_text("")
        error = await refused(client, "vm.snapshot", {"vm_id": vm_id, "path": str(tmp_path / "file" / "x")},
                              code=-32602)
        assert error.data["path"] == "$.path"
        assert (await call(client, vm_id, "next"))["results"] == [1]

