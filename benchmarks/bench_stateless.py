"""Issue 5 benchmark: stateless VMs keep memory flat and calls cheap while the guest keeps growing.

Run: `python benchmarks/bench_stateless.py [--calls N]` (numbers go to stdout; nothing is asserted).

1. Growth. A guest grows its memory by 64 KiB on every call and writes the new page (so it is
   resident), N calls (default 10,000) on one stateless VM with the default knobs: the RSS of
   the sidecar process before and after (target: growth < 160 MiB), next to the same guest on
   a stateful VM in another process, run until `memory.grow` answers -1 (`vm_memory_bytes`).
2. Round trip. In the same process as the stateless run, every growing call is followed by a
   warm call on a stateful VM whose export does not grow, and by the same non-growing call on
   a second stateless VM: their per-call round trips side by side (target: stateless <= 1.5x
   stateful). The second pair separates the pool's overhead from the guest's own work.
3. Recycle cost. One process with `vm_recycle_after_calls` off, two stateless VMs of a
   non-growing guest: one that replaces its instance after every call (per-VM limit 1) and one
   that never does, called in turn; the difference is what a recycle adds to a call's round
   trip. Then the replacement itself (close a store, instantiate the module) timed in process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, SIDECAR, Peer, percentile, rss_bytes

MIB = 1 << 20
GUEST = (ROOT / "tests" / "guests" / "stateless_counter.wat").read_text()  # grow_touch, count
PAIRS = 2_000  # calls per VM in the recycle-cost comparison
CACHE = tempfile.TemporaryDirectory(prefix="bench-stateless-cache-")  # never the user's compile cache


class Sidecar:
    """One sidecar process driven with prebuilt frames; ids count up so answers can be checked."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.peer = Peer(SIDECAR, env={"SIDECAR_LOG_LEVEL": "warning", "SIDECAR_CACHE_DIR": CACHE.name,
                                           **(env or {})})

    @property
    def pid(self) -> int:
        return self.peer.proc.pid

    def request(self, method: str, params: object = None) -> dict:
        return self.peer.result(method, params)

    def vm(self, mode: str, limits: dict | None = None) -> str:
        params = {"wat": GUEST, "mode": mode, **({"limits": limits} if limits else {})}
        return self.request("vm.create", params)["vm_id"]

    def timed_call(self, vm_id: str, export: str) -> tuple[float, int]:
        """One vm.call: its round trip in microseconds and its first result."""
        elapsed, result = self.peer.timed_result("vm.call", {"vm_id": vm_id, "export": export})
        return elapsed, result["results"][0]

    def vm_info(self, vm_id: str) -> dict:
        return next(vm for vm in self.request("vm.list")["vms"] if vm["vm_id"] == vm_id)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def close(self) -> None:
        self.peer.close()


def stats_line(values: list[float]) -> str:
    return (f"mean {statistics.fmean(values):7.1f}  p50 {statistics.median(values):7.1f}  "
            f"p90 {percentile(values, 0.9):7.1f}  p99 {percentile(values, 0.99):7.1f} us")


def growth_and_round_trips(calls: int) -> None:
    sidecar = Sidecar()
    try:
        stateless = sidecar.vm("stateless")
        warm = sidecar.vm("stateful")
        plain = sidecar.vm("stateless")  # the stateless machinery without the guest's growing
        for _ in range(200):  # warm both paths (threads, caches) before the baseline
            sidecar.timed_call(warm, "count")
            sidecar.timed_call(plain, "count")
        limits = {row["name"]: row["value"] for row in sidecar.request("sidecar.limits")["limits"]}
        baseline = sidecar.rss()
        peak_rss, peak_memory = baseline, 0
        grow_times, warm_times, plain_times = [], [], []
        for index in range(calls):
            elapsed, previous = sidecar.timed_call(stateless, "grow_touch")
            if previous < 0:
                raise RuntimeError(f"the stateless VM hit its memory budget at call {index + 1}")
            grow_times.append(elapsed)
            warm_times.append(sidecar.timed_call(warm, "count")[0])
            plain_times.append(sidecar.timed_call(plain, "count")[0])
            if index % 100 == 0:
                peak_rss = max(peak_rss, sidecar.rss())
                peak_memory = max(peak_memory, sidecar.request("sidecar.stats")["vm_memory_bytes"])
        final_rss = sidecar.rss()
        info = sidecar.vm_info(stateless)
    finally:
        sidecar.close()
    print(f"1. growth: {calls:,} calls, each growing and writing 64 KiB "
          f"(vm_recycle_after_calls {limits['vm_recycle_after_calls']}, vm_recycle_memory_bytes "
          f"{limits['vm_recycle_memory_bytes'] / MIB:.0f} MiB, vm_pool_instances {limits['vm_pool_instances']})")
    print(f"  stateless  RSS {baseline / MIB:6.1f} -> peak {peak_rss / MIB:6.1f}, end {final_rss / MIB:6.1f} MiB"
          f"   growth peak {(peak_rss - baseline) / MIB:6.1f} MiB (target < 160)")
    print(f"             vm_memory_bytes peak {peak_memory / MIB:.1f} MiB (sampled every 100 calls); "
          f"recycles {info['recycles']}, instances {info['instances']}")
    stateful_until_budget(calls)
    ratio = statistics.median(grow_times) / statistics.median(warm_times)
    mean_ratio = statistics.fmean(grow_times) / statistics.fmean(warm_times)
    print(f"2. round trip, same process, calls in turn ({calls:,} each)")
    print(f"  stateless grow_touch   {stats_line(grow_times)}")
    print(f"  stateful  count (warm) {stats_line(warm_times)}")
    print(f"  stateless count        {stats_line(plain_times)}")
    print(f"  stateless grow_touch / stateful count: p50 {ratio:.2f}x, mean {mean_ratio:.2f}x (target <= 1.5x)")
    print(f"  stateless count / stateful count:      p50 "
          f"{statistics.median(plain_times) / statistics.median(warm_times):.2f}x, mean "
          f"{statistics.fmean(plain_times) / statistics.fmean(warm_times):.2f}x (the pool's own overhead)")


def stateful_until_budget(calls: int) -> None:
    sidecar = Sidecar()
    try:
        vm_id = sidecar.vm("stateful")
        for _ in range(200):
            sidecar.timed_call(vm_id, "count")
        baseline = sidecar.rss()
        stopped_at, times = None, []
        for index in range(calls):
            elapsed, previous = sidecar.timed_call(vm_id, "grow_touch")
            times.append(elapsed)
            if previous < 0:
                stopped_at = index + 1
                break
        peak_rss = sidecar.rss()
        info = sidecar.vm_info(vm_id)
        budget = next(row["value"] for row in sidecar.request("sidecar.limits")["limits"]
                      if row["name"] == "vm_memory_bytes")
    finally:
        sidecar.close()
    where = f"memory.grow returned -1 at call {stopped_at:,}" if stopped_at else f"never refused in {calls:,} calls"
    print(f"  stateful   RSS {baseline / MIB:6.1f} -> {peak_rss / MIB:6.1f} MiB   "
          f"growth {(peak_rss - baseline) / MIB:6.1f} MiB; {where} "
          f"(vm_memory_bytes {budget / MIB:.0f} MiB, memory_bytes {info['memory_bytes'] / MIB:.1f} MiB)")
    print(f"             its calls until then: {stats_line(times)}")


def recycle_cost() -> None:
    sidecar = Sidecar({"SIDECAR_VM_RECYCLE_AFTER_CALLS": "0", "SIDECAR_VM_POOL_INSTANCES": "1"})
    try:
        every = sidecar.vm("stateless", {"vm_recycle_after_calls": 1})
        never = sidecar.vm("stateless")
        for _ in range(200):
            sidecar.timed_call(every, "count")
            sidecar.timed_call(never, "count")
        every_times, never_times, fresh = [], [], 0
        for _ in range(PAIRS):
            elapsed, count = sidecar.timed_call(every, "count")
            every_times.append(elapsed)
            fresh += count == 1
            never_times.append(sidecar.timed_call(never, "count")[0])
        recycles = sidecar.vm_info(every)["recycles"]
    finally:
        sidecar.close()
    print(f"3. recycle cost, same process, calls in turn ({PAIRS:,} each, vm_pool_instances 1)")
    print(f"  recycle after every call {stats_line(every_times)}   ({fresh:,} served by a fresh instance; {recycles})")
    print(f"  never recycle            {stats_line(never_times)}")
    print(f"  a recycle adds           mean {statistics.fmean(every_times) - statistics.fmean(never_times):7.1f}  "
          f"p50 {statistics.median(every_times) - statistics.median(never_times):7.1f} us to the call that causes it")
    replacement_in_process()


def replacement_in_process(runs: int = 2_000) -> None:
    """Close a store and instantiate the module again, as `_recycle_if_due` does, without the wire."""
    sys.path.insert(0, str(ROOT))
    import wasmtime

    from sidecar.engines import Engines, EngineSettings
    from sidecar.hostcalls import HostCalls
    from sidecar.isolate import Isolate
    from sidecar.limits import load_limits
    from sidecar.modules import INSTRUMENT_ID, ModuleStore, instrument_or_keep
    from sidecar.runtime import NotReading, Runtime

    limits = load_limits({})
    with tempfile.TemporaryDirectory(prefix="bench-stateless-") as cache_dir, Engines(limits) as engines:
        store = ModuleStore(limits, engines, Path(cache_dir))
        compiled = store.load(bytes(wasmtime.wat2wasm(GUEST)), EngineSettings.from_limits(limits),
                              transform=instrument_or_keep, transform_id=INSTRUMENT_ID)
        hostcalls = HostCalls(limits, lambda _frame: None)
        runtime = Runtime(hostcalls, NotReading(), lambda _frame: None)

        def spawn() -> Isolate:
            return Isolate("vm-bench", compiled, limits, runtime, lambda _m, _p: -3)

        isolate = spawn()
        spawn_times, close_times = [], []
        for _ in range(runs):
            started = time.perf_counter()
            isolate.close()
            closed = time.perf_counter()
            isolate = spawn()
            close_times.append((closed - started) * 1e6)
            spawn_times.append((time.perf_counter() - closed) * 1e6)
        isolate.close()
    print(f"  in process ({runs:,} replacements): close {stats_line(close_times)}")
    print(f"                                      start {stats_line(spawn_times)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000, help="growing calls per VM")
    args = parser.parse_args()
    if not Path("/proc/self/status").exists():
        sys.exit("needs /proc (Linux) to read the sidecar's RSS")
    growth_and_round_trips(args.calls)
    recycle_cost()


if __name__ == "__main__":
    main()
