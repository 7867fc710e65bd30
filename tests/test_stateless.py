"""Stateless VMs (issue 5): a warm pool of instances, recycled by calls, memory or a fault.

What a host sees over both transports: a guest's global counter restarts when its instance is
replaced (after `vm_recycle_after_calls` calls, once its memory passes
`vm_recycle_memory_bytes`, or after a trap, timeout or cancel) and never otherwise (zero means
never), `vm.list` `recycles` and `sidecar.stats` `instances_recycled` count each replacement
by reason, two calls run on two instances at once, and a stateful VM keeps its one instance and
its memory budget. A soak on a real process shows the RSS staying flat while the guest keeps
growing its memory, and the debug log names each recycle.

Counter tests pin `vm_pool_instances` to 1 where they need every call on the same instance:
with a bigger pool, a call that arrives while the previous one is still being recycled (after
its answer went out) may start one more warm instance, whose counter starts at 1 too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from protocol.client import RemoteError, SidecarClient

from .guests import call, refused, rpc, vm_info, wat
from .support import WAIT, process_session

pytestmark = pytest.mark.anyio

GUEST = "stateless_counter"
PAGE = 65536
KIB, MIB = 1024, 1024 * 1024
NO_RECYCLES = {"calls": 0, "memory": 0, "trap": 0, "rewound": 0}


def knobs(*, after_calls: int | None = None, memory_bytes: int | None = None, pool: int | None = None,
          **extra: str) -> dict[str, str]:
    """The sidecar's environment for one test: only the knobs it names."""
    env = dict(extra)
    if after_calls is not None:
        env["SIDECAR_VM_RECYCLE_AFTER_CALLS"] = str(after_calls)
    if memory_bytes is not None:
        env["SIDECAR_VM_RECYCLE_MEMORY_BYTES"] = str(memory_bytes)
    if pool is not None:
        env["SIDECAR_VM_POOL_INSTANCES"] = str(pool)
    return env


async def stateless_vm(client: SidecarClient, **params: Any) -> str:
    return (await rpc(client, "vm.create", {"wat": wat(GUEST), "mode": "stateless", **params}))["vm_id"]


async def results(client: SidecarClient, vm_id: str, export: str, times: int, *args: int) -> list[int]:
    """The first result of `times` sequential calls."""
    return [(await call(client, vm_id, export, *args))["results"][0] for _ in range(times)]


async def recycled(client: SidecarClient) -> dict[str, int]:
    return (await rpc(client, "sidecar.stats"))["instances_recycled"]


# -- recycling by calls and by memory ---------------------------------------------------------


async def test_an_instance_is_replaced_after_its_call_budget(session) -> None:
    async with session(env=knobs(after_calls=3, pool=1)) as (client, _):
        vm_id = await stateless_vm(client)
        assert await results(client, vm_id, "count", 9) == [1, 2, 3] * 3
        # With one slot, this call waits for the recycle after the 9th: the counts below are final.
        assert await results(client, vm_id, "count", 1) == [1]
        info = await vm_info(client, vm_id)
        assert info["mode"] == "stateless"
        assert info["recycles"] == {"calls": 3, "memory": 0, "trap": 0, "rewound": 0}
        assert info["calls"] == 10 and info["instances"] == 1
        assert await recycled(client) == {"calls": 3, "memory": 0, "trap": 0, "rewound": 0}


async def test_a_vm_create_can_lower_the_call_budget(session) -> None:
    async with session(env=knobs(pool=1)) as (client, _):
        vm_id = await stateless_vm(client, limits={"vm_recycle_after_calls": 2})
        assert await results(client, vm_id, "count", 5) == [1, 2, 1, 2, 1]
        assert (await vm_info(client, vm_id))["recycles"]["calls"] == 2


async def test_an_instance_is_replaced_once_its_memory_passes_the_mark(session) -> None:
    mark = 256 * KIB  # 4 pages: the instance that grew to 5 is replaced
    async with session(env=knobs(after_calls=0, memory_bytes=mark, pool=1)) as (client, _):
        vm_id = await stateless_vm(client)
        previous_sizes, retained = [], []
        for _ in range(12):
            previous_sizes.append((await call(client, vm_id, "grow", 1))["results"][0])
            retained.append((await vm_info(client, vm_id))["memory_bytes"])
            retained.append((await rpc(client, "sidecar.stats"))["vm_memory_bytes"])
        # "more than the mark": 4 pages (exactly the mark) are kept, 5 are not.
        assert previous_sizes == [1, 2, 3, 4] * 3
        # Seen between an answer and its recycle, an instance may still hold one page past the mark.
        assert max(retained) <= mark + PAGE, retained
        assert await results(client, vm_id, "grow", 1, 1) == [1]  # queued behind the last recycle
        info = await vm_info(client, vm_id)
        assert info["recycles"] == {"calls": 0, "memory": 3, "trap": 0, "rewound": 0}
        assert info["memory_bytes"] == 2 * PAGE
        assert await recycled(client) == {"calls": 0, "memory": 3, "trap": 0, "rewound": 0}


# -- zero means never -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "steps"),
    [
        # 600 calls pass the default call budget (512); memory stays small.
        pytest.param(knobs(after_calls=0, pool=1), [(600, 0)], id="after_calls=0"),
        # 80 calls stay under the default call budget; 81 MiB passes the default mark (64 MiB).
        pytest.param(knobs(memory_bytes=0, pool=1), [(80, 16)], id="memory_bytes=0"),
        pytest.param(knobs(after_calls=0, memory_bytes=0, pool=1), [(600, 0), (80, 16)], id="both=0"),
    ],
)
async def test_zero_means_never(session, env: dict[str, str], steps: list[tuple[int, int]]) -> None:
    async with session(env=env) as (client, _):
        vm_id = await stateless_vm(client)
        counts: list[int] = []
        for times, pages in steps:
            counts += await results(client, vm_id, "bump", times, pages)
        assert counts == list(range(1, len(counts) + 1)), "the counter restarted: an instance was replaced"
        info = await vm_info(client, vm_id)
        assert info["recycles"] == NO_RECYCLES
        assert info["memory_bytes"] == (1 + sum(times * pages for times, pages in steps)) * PAGE
        assert await recycled(client) == NO_RECYCLES


# -- faults retire their instance -------------------------------------------------------------


async def test_a_trapped_instance_is_not_reused(session) -> None:
    async with session(env=knobs(pool=1)) as (client, _):
        vm_id = await stateless_vm(client)
        assert await results(client, vm_id, "count", 2) == [1, 2]
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "trap"}, code=-32003)
        assert error.data["trap_code"] == "unreachable"
        assert await results(client, vm_id, "count", 2) == [1, 2]
        info = await vm_info(client, vm_id)
        assert info["recycles"] == {"calls": 0, "memory": 0, "trap": 1, "rewound": 0}
        assert info["instances"] == 1
        assert await recycled(client) == {"calls": 0, "memory": 0, "trap": 1, "rewound": 0}


async def test_a_timed_out_instance_is_not_reused(session) -> None:
    async with session(env=knobs(pool=1)) as (client, _):
        vm_id = await stateless_vm(client)
        assert await results(client, vm_id, "count", 2) == [1, 2]
        error = await refused(client, "vm.call", {"vm_id": vm_id, "export": "spin", "timeout_ms": 50}, code=-32004)
        assert error.data["limit"] == "vm_call_timeout_ms"
        assert await results(client, vm_id, "count", 1) == [1]
        assert (await vm_info(client, vm_id))["recycles"] == {"calls": 0, "memory": 0, "trap": 1, "rewound": 0}


async def test_a_cancelled_call_retires_its_instance(session) -> None:
    """The guest is cancelled while it waits on the host; `host_call` hands it a refusal and it
    runs on to return normally, but its call was cut short: the instance must not serve again."""
    asked = anyio.Event()

    async def host(vm_id: str, method: str, params: Any) -> Any:
        asked.set()
        await anyio.sleep_forever()  # never answers: the cancel ends the call

    async with session(env=knobs(pool=1), host_handler=host) as (client, _):
        vm_id = await stateless_vm(client)
        assert await results(client, vm_id, "count", 2) == [1, 2]
        request_id, result = await client.start_request("vm.call", {"vm_id": vm_id, "export": "wait_host"})
        with anyio.fail_after(WAIT):
            await asked.wait()
        await client.cancel(request_id)
        with anyio.fail_after(WAIT), pytest.raises(RemoteError) as caught:
            await result()
        assert caught.value.code == -32800
        assert await results(client, vm_id, "count", 1) == [1], "the cancelled call's instance served again"
        assert sum((await vm_info(client, vm_id))["recycles"].values()) == 1


# -- the pool serves calls in parallel --------------------------------------------------------


async def test_two_instances_serve_two_calls_at_once(session) -> None:
    """Each call blocks in `host_call` until the host has seen both: only two instances at once
    can get there. One instance would leave the second call queued and the first unanswered."""
    seen: list[str] = []
    both = anyio.Event()

    async def host(vm_id: str, method: str, params: Any) -> Any:
        seen.append(method)
        if len(seen) == 2:
            both.set()
        await both.wait()
        return {"ok": True}

    async with session(env=knobs(pool=2), host_handler=host) as (client, _):
        vm_id = await stateless_vm(client)
        pending = [await client.start_request("vm.call", {"vm_id": vm_id, "export": "wait_host"}) for _ in range(2)]
        with anyio.fail_after(WAIT):
            await both.wait()
            answers = [await result() for _, result in pending]
        assert sorted(answer["results"][0] for answer in answers) == [1, 1]  # two fresh instances
        assert seen == ["wait", "wait"]
        info = await vm_info(client, vm_id)
        assert info["instances"] == 2 and info["recycles"] == NO_RECYCLES


async def test_with_one_instance_the_second_call_waits_its_turn(session) -> None:
    seen: list[str] = []
    first_asked, release = anyio.Event(), anyio.Event()

    async def host(vm_id: str, method: str, params: Any) -> Any:
        seen.append(method)
        first_asked.set()
        await release.wait()
        return {"ok": True}

    async with session(env=knobs(pool=1), host_handler=host) as (client, _):
        vm_id = await stateless_vm(client)
        first = await client.start_request("vm.call", {"vm_id": vm_id, "export": "wait_host"})
        second = await client.start_request("vm.call", {"vm_id": vm_id, "export": "wait_host"})
        with anyio.fail_after(WAIT):
            await first_asked.wait()
        # The sidecar reads in order: when this answer comes, it has taken in the second call,
        # which, had it started, would have sent its host.call before letting go of the input.
        stats = await rpc(client, "sidecar.stats")
        assert stats["host_calls_pending"] == 1, "the second call did not wait for the only instance"
        info = await vm_info(client, vm_id)
        assert info["state"] == "busy" and info["instances"] == 1
        release.set()
        with anyio.fail_after(WAIT):
            answers = [await first[1](), await second[1]()]
        assert [answer["results"][0] for answer in answers] == [1, 2]  # one instance, in turn
        assert seen == ["wait", "wait"]


# -- stateful VMs are unchanged ---------------------------------------------------------------


async def test_a_stateful_vm_keeps_its_instance_and_its_memory_budget(session) -> None:
    async with session(env=knobs(after_calls=3, memory_bytes=128 * KIB, pool=1)) as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": wat(GUEST), "limits": {"vm_memory_bytes": 256 * KIB}}))["vm_id"]
        assert await results(client, vm_id, "count", 10) == list(range(1, 11))
        # grow past vm_memory_bytes (4 pages) answers -1 to the guest: no trap, no recycle.
        assert await results(client, vm_id, "grow", 5, 1) == [1, 2, 3, -1, -1]
        await refused(client, "vm.call", {"vm_id": vm_id, "export": "trap"}, code=-32003)
        assert await results(client, vm_id, "count", 2) == [11, 12]  # the trap kept the state too
        info = await vm_info(client, vm_id)
        assert info["mode"] == "stateful" and info["instances"] == 1
        assert info["memory_bytes"] == 256 * KIB
        assert info["recycles"] == NO_RECYCLES
        assert await recycled(client) == NO_RECYCLES


async def test_a_stateless_instance_has_the_same_memory_budget(session) -> None:
    async with session(env=knobs(after_calls=0, memory_bytes=0, pool=1)) as (client, _):
        vm_id = await stateless_vm(client, limits={"vm_memory_bytes": 256 * KIB})
        assert await results(client, vm_id, "grow", 5, 1) == [1, 2, 3, -1, -1]
        assert (await vm_info(client, vm_id))["memory_bytes"] == 256 * KIB


# -- a real process: RSS and logs ---------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_soak_memory_stays_bounded_while_the_guest_keeps_growing() -> None:
    """600 calls that each grow and write a page would leave 37.5 MiB resident on one instance
    (measured: RSS +37.8 MiB with both knobs at 0); recycling at 4 MiB keeps the process's RSS
    and its instances' memory flat. One slot, so the retained memory has a one-instance bound."""
    calls, mark = 600, 4 * MIB
    async with process_session(env=knobs(memory_bytes=mark, pool=1)) as (client, _):
        assert client.process is not None
        vm_id = await stateless_vm(client)
        assert await results(client, vm_id, "grow_touch", 70) == [*range(1, 65), *range(1, 7)]  # one cycle: warm
        baseline = rss_bytes(client.process.pid)
        peak_rss, peak_memory = baseline, 0
        for index in range(calls):
            assert (await call(client, vm_id, "grow_touch"))["results"][0] >= 1
            if index % 25 == 0:
                peak_rss = max(peak_rss, rss_bytes(client.process.pid))
                peak_memory = max(peak_memory, (await rpc(client, "sidecar.stats"))["vm_memory_bytes"])
        peak_rss = max(peak_rss, rss_bytes(client.process.pid))
        info = await vm_info(client, vm_id)
    growth = peak_rss - baseline
    assert growth < 16 * MIB, f"RSS grew {growth / MIB:.1f} MiB over {calls} calls"
    assert peak_memory <= mark + PAGE
    assert info["recycles"]["memory"] >= calls // 65 + 1


async def test_each_recycle_is_a_debug_event_on_stderr(tmp_path: Path) -> None:
    log_path = tmp_path / "stderr.jsonl"
    env = {**os.environ, **knobs(after_calls=2, pool=1, SIDECAR_LOG_LEVEL="debug")}
    with log_path.open("wb") as log_file:
        async with SidecarClient.spawn(env=env, stderr=log_file.fileno()) as client:
            vm_id = await stateless_vm(client)
            assert await results(client, vm_id, "count", 4) == [1, 2, 1, 2]
            await refused(client, "vm.call", {"vm_id": vm_id, "export": "trap"}, code=-32003)
            assert await results(client, vm_id, "count", 1) == [1]
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    recycles = [event for event in events if event.get("event") == "instance_recycled"]
    assert [(event["vm_id"], event["reason"]) for event in recycles] == [
        (vm_id, "calls"), (vm_id, "calls"), (vm_id, "trap")
    ]
    assert all(event["level"] == "debug" for event in recycles)
    assert [event["calls"] for event in recycles] == [2, 2, 1]
