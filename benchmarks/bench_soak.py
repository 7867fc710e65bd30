"""Soak benchmark: does the sidecar's memory stay flat across many VMs and many calls?

Run: `python benchmarks/bench_soak.py [--vms N] [--calls N]` (numbers go to stdout; nothing is
asserted). One sidecar process, four phases, the RSS of that process (VmRSS) before and after
each, and what each operation cost:

1. churn: N VMs (default 1,000) created from a loaded module and disposed, one after the other;
2. alive: N VMs created and kept (all alive at once, `runner_vms` allows 1,000), then disposed;
   twice, so memory that a leak holds (grows again) tells from memory the allocator keeps (reused);
3. stateful: N calls (default 10,000) on one stateful VM, each echoing 1 KiB through the guest ABI;
4. stateless: the same calls on one stateless VM (its instances recycle as configured).

A leak shows as RSS that grows with N and stays after the dispose; the allocator keeps some
freed memory, so compare the phases with each other rather than with zero.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from harness import ROOT, SIDECAR, Peer, percentile, rss_bytes

MIB = 1 << 20
GUEST = (ROOT / "tests" / "guests" / "abi.wat").read_text()  # echo, count
PAYLOAD = "x" * 1024


class Soak:
    """One sidecar; requests one at a time, ids counting up, errors raised."""

    def __init__(self, cache_dir: str) -> None:
        self.peer = Peer(SIDECAR, env={"SIDECAR_LOG_LEVEL": "warning", "SIDECAR_CACHE_DIR": cache_dir})

    def request(self, method: str, params: object = None) -> dict:
        return self.peer.result(method, params)

    def timed(self, method: str, params: object) -> tuple[float, dict]:
        """One request's round trip in microseconds, and its result."""
        return self.peer.timed_result(method, params)

    def rss(self) -> int:
        return rss_bytes(self.peer.proc.pid)

    def close(self) -> None:
        self.peer.close()


def line(values: list[float]) -> str:
    return f"p50 {statistics.median(values):8.1f}  p90 {percentile(values, 0.9):8.1f}  " \
           f"p99 {percentile(values, 0.99):8.1f} us"


def phase(soak: Soak, name: str, before: int, times: dict[str, list[float]]) -> int:
    after = soak.rss()
    stats = soak.request("sidecar.stats")
    print(f"{name:<12} RSS {before / MIB:7.1f} -> {after / MIB:7.1f} MiB  ({(after - before) / MIB:+7.1f})   "
          f"vms {stats['vms']}, vm_memory_bytes {stats['vm_memory_bytes'] / MIB:.1f} MiB")
    for what, values in times.items():
        print(f"{'':12} {what:<14} {line(values)}")
    return after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1_000)
    parser.add_argument("--calls", type=int, default=10_000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-soak-cache-") as cache:
        soak = Soak(cache)
        try:
            run(soak, options.vms, options.calls)
        finally:
            soak.close()


def run(soak: Soak, vms: int, calls: int) -> None:
    module_id = soak.request("module.load", {"wat": GUEST})["module_id"]
    for _ in range(50):  # warm the paths (threads, caches) before the baseline
        vm_id = soak.request("vm.create", {"module_id": module_id})["vm_id"]
        soak.request("vm.call", {"vm_id": vm_id, "export": "echo", "input": PAYLOAD})
        soak.request("vm.dispose", {"vm_id": vm_id})
    start = rss = soak.rss()
    print(f"sidecar pid {soak.peer.proc.pid}: {vms:,} VMs, {calls:,} calls per VM mode, RSS at start "
          f"{start / MIB:.1f} MiB")

    creates, disposes = [], []
    for _ in range(vms):
        elapsed, result = soak.timed("vm.create", {"module_id": module_id})
        creates.append(elapsed)
        disposes.append(soak.timed("vm.dispose", {"vm_id": result["vm_id"]})[0])
    rss = phase(soak, "1. churn", rss, {"vm.create": creates, "vm.dispose": disposes})

    for round_ in (1, 2):  # twice: memory a leak holds grows again, memory the allocator keeps is reused
        creates, disposes, alive = [], [], []
        for _ in range(vms):
            elapsed, result = soak.timed("vm.create", {"module_id": module_id})
            creates.append(elapsed)
            alive.append(result["vm_id"])
        peak = soak.rss()
        print(f"2. alive, round {round_}: RSS with {len(alive):,} VMs alive {peak / MIB:7.1f} MiB  "
              f"({(peak - rss) / MIB:+7.1f}, {(peak - rss) / len(alive) / 1024:.1f} KiB per VM)")
        for vm_id in alive:
            disposes.append(soak.timed("vm.dispose", {"vm_id": vm_id})[0])
        rss = phase(soak, "   disposed", rss, {"vm.create": creates, "vm.dispose": disposes})

    for mode in ("stateful", "stateless"):
        vm_id = soak.request("vm.create", {"module_id": module_id, "mode": mode})["vm_id"]
        times, mid = [], 0
        for index in range(calls):
            elapsed, result = soak.timed("vm.call", {"vm_id": vm_id, "export": "echo", "input": PAYLOAD})
            if result["output"] != PAYLOAD:
                raise RuntimeError(f"echo answered {result['output'][:40]!r}")
            times.append(elapsed)
            if index == calls // 2:
                mid = soak.rss()
        info = next(vm for vm in soak.request("vm.list")["vms"] if vm["vm_id"] == vm_id)
        print(f"{'':12} {mode}: RSS half way {mid / MIB:.1f} MiB; instances {info['instances']}, "
              f"recycles {info['recycles']}, memory_bytes {info['memory_bytes'] / MIB:.1f} MiB")
        rss = phase(soak, f"{3 if mode == 'stateful' else 4}. {mode}", rss, {"vm.call echo": times})
        soak.request("vm.dispose", {"vm_id": vm_id})
    end = soak.rss()
    print(f"end          RSS {end / MIB:7.1f} MiB, {(end - start) / MIB:+.1f} MiB since the start")


if __name__ == "__main__":
    main()
