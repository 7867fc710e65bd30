"""The MCP front (issue 16): what `run_python` through `wasm-sidecar mcp` costs over the `vm.eval`
it stands for, measured against the daemon's own `vm.eval` in the same run.

Run: `python benchmarks/bench_mcp.py [--evals N] [--rounds N]` (numbers go to stdout; nothing is
asserted). Needs the runtime installed (`wasm-sidecar runtime install python`). Latencies are round
trips on a raw pipe, microseconds; each round measures the daemon and the MCP front back to back,
so the ratio of a round compares like with like on a busy machine.

Measured, per round:
1. a session turn, `x += 1`: `vm.eval` on a stateful VM vs `run_python {session}`;
2. a fresh sandbox, `print(1+1)`: `vm.eval` on a stateless VM vs `run_python` without a session;
3. once: a session's first use (`run_python {session}` on a new name: a stateful VM made) vs
   `vm.create {runtime: "python"}` followed by its first `vm.eval`;
4. hibernation: a session's first use on a server with `--state-dir` (its session table written
   durably) vs one without; a turn that wakes a hibernated session vs a resident session's turn
   (two sessions take turns under `runner_resident_vms` 1: each turn waits, untimed, until its
   session has gone to disk, then times the call that wakes it).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time

from harness import SIDECAR, Peer, percentile

FIRST_USES = 10
LIST = {"name": "list_sessions", "arguments": {}}
MCP_INIT = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}


def peer(cache_dir: str, *extra: str) -> Peer:
    return Peer([*SIDECAR, *extra], env={"SIDECAR_LOG_LEVEL": "warning", "SIDECAR_CACHE_DIR": cache_dir})


def series(call, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    call()  # the first of a series pays for anything cold
    return [call() for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, default=200, help="round trips per series")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each measuring both fronts")
    args = parser.parse_args()
    cache_dir = tempfile.mkdtemp(prefix="bench-mcp-cache-")
    daemon, mcp = peer(cache_dir), peer(cache_dir, "mcp")
    kept = peer(cache_dir, "mcp", "--state-dir", tempfile.mkdtemp(prefix="bench-mcp-state-"))
    capped = Peer([*SIDECAR, "mcp", "--state-dir", tempfile.mkdtemp(prefix="bench-mcp-state-")],
                  env={"SIDECAR_LOG_LEVEL": "warning", "SIDECAR_CACHE_DIR": cache_dir,
                       "SIDECAR_RUNNER_RESIDENT_VMS": "1"})
    try:
        daemon.result("initialize")
        mcp.result("initialize", MCP_INIT)
        kept.result("initialize", MCP_INIT)
        capped.result("initialize", MCP_INIT)

        started = time.perf_counter()
        session_vm = daemon.result("vm.create", {"runtime": "python"})["vm_id"]  # the bake, first time
        daemon.result("vm.eval", {"vm_id": session_vm, "code": "x = 0"})
        print(f"daemon: first Python VM (bake included) + eval   {(time.perf_counter() - started) * 1000:8.1f} ms")
        fresh_vm = daemon.result("vm.create", {"runtime": "python", "mode": "stateless"})["vm_id"]

        def mcp_call(arguments: dict, front: Peer = mcp) -> float:
            elapsed, result = front.timed_result("tools/call", {"name": "run_python", "arguments": arguments})
            assert not result.get("isError"), result
            return elapsed

        def daemon_eval(vm_id: str, code: str) -> float:
            return daemon.timed_result("vm.eval", {"vm_id": vm_id, "code": code})[0]

        first_daemon = []
        first_mcp = []
        for n in range(FIRST_USES):
            started = time.perf_counter()
            vm_id = daemon.result("vm.create", {"runtime": "python"})["vm_id"]
            daemon.result("vm.eval", {"vm_id": vm_id, "code": "x = 0"})
            first_daemon.append((time.perf_counter() - started) * 1e6)
            daemon.result("vm.dispose", {"vm_id": vm_id})
            first_mcp.append(mcp_call({"code": "x = 0", "session": f"first{n}"}))
        print(f"first use of a session: vm.create+vm.eval p50 {statistics.median(first_daemon) / 1000:7.2f} ms, "
              f"run_python p50 {statistics.median(first_mcp) / 1000:7.2f} ms ({FIRST_USES} each, interleaved)")

        first_none, first_kept = [], []
        for n in range(FIRST_USES):
            first_none.append(mcp_call({"code": "x = 0", "session": f"again{n}"}))
            first_kept.append(mcp_call({"code": "x = 0", "session": f"first{n}"}, kept))
        print(f"first use of a session: without a state directory p50 {statistics.median(first_none) / 1000:7.2f} ms, "
              f"with one p50 {statistics.median(first_kept) / 1000:7.2f} ms (ratio "
              f"{statistics.median(first_kept) / statistics.median(first_none):.2f}, {FIRST_USES} each, interleaved)")
        for name in ("a", "b"):
            mcp_call({"code": "x = 0", "session": name}, capped)
        turns = itertools.cycle(["a", "b"])

        def wake_turn() -> float:
            session = next(turns)
            while next(row["resident"] for row in capped.result("tools/call", LIST)["structuredContent"]["sessions"]
                       if row["session"] == session):
                time.sleep(0.001)  # the watcher hibernates it off the request path; untimed
            return mcp_call({"code": "x += 1", "session": session}, capped)

        mcp_call({"code": "x = 0", "session": "s"})
        kinds = {  # name: (baseline's label, baseline, label, measured)
            "session turn (x += 1)": ("vm.eval", lambda: daemon_eval(session_vm, "x += 1"),
                                      "run_python", lambda: mcp_call({"code": "x += 1", "session": "s"})),
            "fresh sandbox (print(1+1))": ("vm.eval", lambda: daemon_eval(fresh_vm, "print(1+1)"),
                                           "run_python", lambda: mcp_call({"code": "print(1+1)"})),
            "session turn that wakes a hibernated session (x += 1)": (
                "resident", lambda: mcp_call({"code": "x += 1", "session": "s"}), "waking", wake_turn),
        }
        for name, (base_label, baseline, label, front) in kinds.items():
            ratios, all_base, all_front = [], [], []
            for _ in range(args.rounds):
                base, over = series(baseline, args.evals), series(front, args.evals)
                ratios.append(statistics.median(over) / statistics.median(base))
                all_base += base
                all_front += over
            print(f"{name}:")
            for what, values in ((base_label, all_base), (label, all_front)):
                print(f"  {what:<10}  p50 {statistics.median(values):8.1f}  p90 {percentile(values, 0.9):8.1f} us")
            print(f"  ratio of p50s per round: {' '.join(f'{r:.2f}' for r in ratios)} "
                  f"(median {statistics.median(ratios):.2f}, {args.rounds} rounds of {args.evals})")
    finally:
        daemon.close()
        mcp.close()
        kept.close()
        capped.close()


if __name__ == "__main__":
    sys.exit(main())
