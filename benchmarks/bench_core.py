"""Issue 2 benchmark: pipelined ping throughput against a bare Python echo, and cold start.

Run: `python benchmarks/bench_core.py` (numbers go to stdout; nothing is asserted).
"""

from __future__ import annotations

import json
import statistics
import time

from harness import ECHO, SIDECAR, Peer, pipelined, round_trips, summary

PING = b'{"jsonrpc":"2.0","id":7,"method":"ping"}\n'
TOTAL = 100_000
WINDOW = 128


def throughput(argv: list[str]) -> float:
    peer = Peer(argv)
    try:
        peer.request("ping")  # started and serving
        pipelined(peer, 5_000, WINDOW, PING)  # warm-up
        return max(pipelined(peer, TOTAL, WINDOW, PING) for _ in range(3))
    finally:
        peer.close()


def cold_start_ms(runs: int = 10) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        peer = Peer(SIDECAR)
        peer.request("ping")
        times.append((time.perf_counter() - started) * 1000)
        peer.close()
    return times


def exit_after_eof_ms(runs: int = 5) -> list[float]:
    """From closing the sidecar's stdin (with a busy guest in flight) to its exit."""
    spin = '(module (func (export "spin") (loop $l (br $l))))'
    times = []
    for _ in range(runs):
        peer = Peer(SIDECAR)
        vm = peer.request("vm.create", {"wat": spin})["result"]["vm_id"]
        call = {"jsonrpc": "2.0", "id": 9, "method": "vm.call", "params": {"vm_id": vm, "export": "spin"}}
        peer.send(json.dumps(call).encode() + b"\n")
        started = time.perf_counter()
        peer.proc.stdin.close()
        peer.proc.wait(10)
        times.append((time.perf_counter() - started) * 1000)
        peer.proc.stdout.close()
    return times


def latency(argv: list[str]) -> list[float]:
    peer = Peer(argv)
    try:
        round_trips(peer, PING, 500)
        return round_trips(peer, PING, 3000)
    finally:
        peer.close()


def main() -> None:
    echo = throughput(ECHO)
    sidecar = throughput(SIDECAR)
    print(f"pipelined ping, {WINDOW} in flight, {TOTAL} requests (best of 3)")
    print(f"  echo baseline   {echo:10.0f} req/s")
    print(f"  wasm-sidecar    {sidecar:10.0f} req/s   ratio {sidecar / echo:.2f}x (target >= 0.5x, aim 0.8x)")
    echo_rt, sidecar_rt = latency(ECHO), latency(SIDECAR)
    print("sequential round trip, microseconds")
    print(f"  echo baseline   {summary(echo_rt)}")
    ratio = statistics.median(sidecar_rt) / statistics.median(echo_rt)
    print(f"  wasm-sidecar    {summary(sidecar_rt)}   p50 ratio {ratio:.2f}x")
    cold = cold_start_ms()
    print(f"cold start to first answer: median {statistics.median(cold):.0f} ms, max {max(cold):.0f} ms "
          "(target <= 400 ms, aim 150 ms)")
    gone = exit_after_eof_ms()
    print(f"end of input to exit, a guest spinning: median {statistics.median(gone):.0f} ms, max {max(gone):.0f} ms "
          "(target < 1000 ms)")


if __name__ == "__main__":
    main()
