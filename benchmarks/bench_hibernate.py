"""Hibernation (issue 14): memory that follows activity, wakes, and VMs that outlive a SIGKILL.

Run: `python benchmarks/bench_hibernate.py [--vms N] [--cap N] [--sessions N]` (numbers go to stdout;
nothing is asserted). Each measure runs real `python -m sidecar` processes on raw pipes, with a
baseline measured in the same run. The small stateful VM is a counter whose state lives in an
internal global and its one page of memory.

Measured (targets from the issue):
1. RSS of `--vms` small VMs under `runner_resident_vms` = `--cap`, against a process holding `--cap`
   of them and nothing else: target <= baseline + 64 MiB;
2. the wake of a hibernated VM on its next `vm.call`, target p50 <= 2 ms, p99 <= 10 ms, beside a call
   to a resident VM in the same process;
3. hibernating 1,000 idle VMs (`vm.hibernate`, pipelined), target <= 2 s;
4. `--sessions` Python sessions with a resident cap of `--sessions`/10: RSS against the cap's worth
   of sessions alone, and every session keeps its names (needs the runtime installed);
5. SIGKILL of a sidecar whose VMs hibernated, and a restart on the same state directory: time to
   serve, and every VM back with its state.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, SIDECAR, Peer, percentile, rss_bytes

sys.path.insert(0, str(ROOT))
from sidecar import runtimes  # noqa: E402

MiB = 1 << 20
COUNTER = """
(module
  (memory 1)
  (global $count (mut i32) (i32.const 0))
  (func (export "next") (result i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (i32.store (i32.const 40000) (i32.mul (global.get $count) (i32.const 10)))
    (global.get $count))
  (func (export "stored") (result i32) (i32.load (i32.const 40000)))
)
"""


def sidecar(scratch: Path, **env: str | int) -> Peer:
    """A sidecar on a state directory of its own (files written durably, as a deployment keeps them)."""
    state = tempfile.mkdtemp(prefix="state-", dir=scratch)
    base = {"SIDECAR_LOG_LEVEL": "warning", "SIDECAR_CACHE_DIR": str(scratch / "cache"), "SIDECAR_RUNNER_VMS": "20000",
            "SIDECAR_STATE_DIR": state}
    return Peer(SIDECAR, env={**base, **{f"SIDECAR_{key.upper()}": str(value) for key, value in env.items()}})


def pipelined(peer: Peer, requests: list[tuple[str, dict]]) -> list[dict]:
    """Send every request at once; the answers in order of their ids."""
    frames = b"".join(json.dumps({"jsonrpc": "2.0", "id": index, "method": method, "params": params}).encode() + b"\n"
                      for index, (method, params) in enumerate(requests))
    peer.send(frames)
    answers = sorted((json.loads(line) for line in peer.read_lines(len(requests))), key=lambda answer: answer["id"])
    failed = [answer for answer in answers if "error" in answer]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
    return [answer["result"] for answer in answers]


def counters(peer: Peer, count: int, batch: int = 50) -> list[str]:
    """`count` counter VMs, the i-th counted up to i % 7 + 1 (so states differ), made and used `batch`
    at a time (fewer than a resident cap: the VMs of a batch are used before the cap sends them away)."""
    module_id = peer.result("module.load", {"wat": COUNTER})["module_id"]
    vm_ids: list[str] = []
    for start in range(0, count, batch):
        size = min(batch, count - start)
        created = pipelined(peer, [("vm.create", {"module_id": module_id})] * size)
        ids = [result["vm_id"] for result in created]
        pipelined(peer, [("vm.call", {"vm_id": vm_id, "export": "next"})
                         for n, vm_id in enumerate(ids, start) for _ in range(n % 7 + 1)])
        vm_ids += ids
    return vm_ids


def wait_for(peer: Peer, field: str, at_least: int, within_s: float = 120) -> float:
    started = time.monotonic()
    while peer.result("sidecar.stats")[field] < at_least:
        if time.monotonic() - started > within_s:
            raise RuntimeError(f"{field} did not reach {at_least} in {within_s} s")
        time.sleep(0.05)
    return time.monotonic() - started


def ms_line(name: str, values_us: list[float]) -> str:
    values = [value / 1000 for value in values_us]
    return (f"  {name:<36} p50 {statistics.median(values):7.3f}  p90 {percentile(values, 0.9):7.3f}  "
            f"p99 {percentile(values, 0.99):7.3f} ms  (n={len(values)})")


def resident_memory(args: argparse.Namespace, scratch: Path) -> None:
    print(f"1-2. {args.vms} small stateful VMs, runner_resident_vms={args.cap}")
    base = sidecar(scratch)
    counters(base, args.cap)
    time.sleep(0.5)
    baseline = rss_bytes(base.proc.pid)
    base.close()
    print(f"  baseline: {args.cap} VMs, no cap: RSS {baseline / MiB:.1f} MiB")

    peer = sidecar(scratch, runner_resident_vms=args.cap)
    started = time.monotonic()
    vm_ids = counters(peer, args.vms)
    created_s = time.monotonic() - started
    wait_for(peer, "hibernations", args.vms - args.cap)
    time.sleep(0.5)
    capped = rss_bytes(peer.proc.pid)
    stats = peer.result("sidecar.stats")
    print(f"  {args.vms} VMs made and used in {created_s:.1f} s; hibernations {stats['hibernations']}, "
          f"state_bytes {stats['state_bytes'] / MiB:.1f} MiB")
    print(f"  capped: RSS {capped / MiB:.1f} MiB = baseline + {(capped - baseline) / MiB:.1f} MiB "
          f"(target <= + 64 MiB: {'met' if capped - baseline <= 64 * MiB else 'NOT met'})")

    resident_vm = vm_ids[-1]
    rng = random.Random(14)
    asleep = rng.sample(vm_ids[: args.vms - 2 * args.cap], args.wakes)
    resident_us, wake_us = [], []
    for vm_id in asleep:  # alternate, so both series see the same load
        resident_us.append(peer.timed_result("vm.call", {"vm_id": resident_vm, "export": "next"})[0])
        elapsed, result = peer.timed_result("vm.call", {"vm_id": vm_id, "export": "stored"})
        wake_us.append(elapsed)
        number = int(vm_id.removeprefix("vm-")) - 1  # ids are issued in order, from vm-1
        if result["results"] != [(number % 7 + 1) * 10]:
            raise RuntimeError(f"{vm_id} woke with {result['results']}")
    print(ms_line("vm.call, resident VM (baseline)", resident_us))
    print(ms_line("vm.call that wakes a VM", wake_us))
    print(f"  wake p50 / baseline p50: {statistics.median(wake_us) / statistics.median(resident_us):.1f}x "
          f"(targets p50 <= 2 ms, p99 <= 10 ms); wakes {peer.result('sidecar.stats')['wakes']}")
    started = time.monotonic()
    peer.close()  # an orderly exit: the resident VMs hibernate first
    print(f"  orderly exit with {args.cap} resident VMs to hibernate: {time.monotonic() - started:.2f} s")


def hibernate_many(scratch: Path, count: int = 1000) -> None:
    print(f"3. hibernating {count} idle VMs")
    peer = sidecar(scratch)
    vm_ids = counters(peer, count)
    calls = [("vm.call", {"vm_id": vm_id, "export": "stored"}) for vm_id in vm_ids]
    started = time.perf_counter()
    pipelined(peer, calls)
    calls_s = time.perf_counter() - started
    started = time.perf_counter()
    pipelined(peer, [("vm.hibernate", {"vm_id": vm_id}) for vm_id in vm_ids])
    hibernate_s = time.perf_counter() - started
    stats = peer.result("sidecar.stats")
    print(f"  {count} vm.hibernate, pipelined: {hibernate_s:.2f} s ({hibernate_s / count * 1e3:.2f} ms each; "
          f"target <= 2 s); baseline, {count} vm.call pipelined: {calls_s:.2f} s")
    print(f"  state_bytes {stats['state_bytes'] / 1024:.0f} KiB ({stats['state_bytes'] / count:.0f} B per VM)")
    peer.close()


def python_sessions(args: argparse.Namespace, scratch: Path) -> None:
    cap = max(1, args.sessions // 10)
    print(f"4. {args.sessions} Python sessions, runner_resident_vms={cap}")
    if runtimes.find("python") is None:
        print("  skipped: the Python runtime is not installed (wasm-sidecar runtime install python)")
        return

    def sessions(peer: Peer, count: int) -> list[str]:
        vm_ids = []
        for n in range(count):
            vm_ids.append(peer.result("vm.create", {"runtime": "python"})["vm_id"])
            code = f"import json\nname = 'session-{n}'\ndata = list(range({n}))"
            peer.result("vm.eval", {"vm_id": vm_ids[-1], "code": code})
        return vm_ids

    warm = sidecar(scratch)  # bakes and compiles the runtime into the cache: neither process below pays for it
    sessions(warm, 1)
    warm.close()
    base = sidecar(scratch)
    sessions(base, cap)
    time.sleep(0.5)
    baseline = rss_bytes(base.proc.pid)
    base.close()
    peer = sidecar(scratch, runner_resident_vms=cap)
    started = time.monotonic()
    vm_ids = sessions(peer, args.sessions)
    made_s = time.monotonic() - started
    wait_for(peer, "hibernations", args.sessions - cap)
    time.sleep(0.5)
    capped = rss_bytes(peer.proc.pid)
    print(f"  baseline {cap} sessions: RSS {baseline / MiB:.1f} MiB; {args.sessions} sessions capped at {cap} "
          f"(made in {made_s:.1f} s): RSS {capped / MiB:.1f} MiB = baseline + {(capped - baseline) / MiB:.1f} MiB")
    wake_ms, kept = [], 0
    for n, vm_id in enumerate(vm_ids):
        elapsed, result = peer.timed_result("vm.eval", {"vm_id": vm_id, "code": "(name, sum(data))"})
        wake_ms.append(elapsed / 1000)
        kept += result["value"] == repr((f"session-{n}", sum(range(n))))
    print(f"  every session keeps its names: {kept}/{len(vm_ids)}; eval that wakes a session: "
          f"p50 {statistics.median(wake_ms):.1f} ms, p99 {percentile(wake_ms, 0.99):.1f} ms")
    peer.close()


def sigkill_restart(scratch: Path, count: int) -> None:
    print(f"5. SIGKILL and restart on the same state directory, {count} hibernated VMs")
    state = scratch / "state"
    peer = sidecar(scratch, state_dir=state)
    vm_ids = counters(peer, count)
    pipelined(peer, [("vm.hibernate", {"vm_id": vm_id}) for vm_id in vm_ids])
    peer.proc.send_signal(signal.SIGKILL)
    peer.proc.wait(10)

    started = time.perf_counter()
    peer = sidecar(scratch, state_dir=state)
    peer.result("ping")
    ready_s = time.perf_counter() - started
    listed = {vm["vm_id"] for vm in peer.result("vm.list")["vms"]}
    answers = pipelined(peer, [("vm.call", {"vm_id": vm_id, "export": "stored"}) for vm_id in vm_ids])
    back = sum(answer["results"] == [(n % 7 + 1) * 10] for n, answer in enumerate(answers))
    print(f"  restarted and serving in {ready_s:.2f} s; listed {len(listed & set(vm_ids))}/{count}; "
          f"back with their state {back}/{count}")
    peer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=10000)
    parser.add_argument("--cap", type=int, default=100)
    parser.add_argument("--wakes", type=int, default=500, help="wake samples")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--only", type=int, nargs="*", help="run only these measures (1, 3, 4, 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hibernate-") as name:
        scratch = Path(name)
        measures = {1: lambda: resident_memory(args, scratch), 3: lambda: hibernate_many(scratch),
                    4: lambda: python_sessions(args, scratch), 5: lambda: sigkill_restart(scratch, 1000)}
        for number, measure in measures.items():
            if not args.only or number in args.only:
                measure()


if __name__ == "__main__":
    main()
