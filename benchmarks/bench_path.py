"""Issue 15, the request path: each row as a ratio against the echo process measured in this run.

Run: `python benchmarks/bench_path.py [--calls N] [--echoes N] [--rounds N] [--baseline DIR]`
(numbers go to stdout; nothing is asserted).

The echo's p50 is bimodal on the target machine (~35 µs in some processes, ~92 µs in others,
whatever the load), so the baseline is the best p50 of `--echoes` echo processes, each sampled in
alternating blocks with the sidecar's series (`bench_vm.interleaved`): every ratio compares samples
of the same moments against the fastest echo seen. Rows:

1. `vm.call` of `add(2, 40)`, round trip p50 vs the echo's best p50 (target <= 1.3x);
2. a `vm.call` whose guest makes one `host_call` answered by this script (target <= 2.5x);
3. `vm.create` from a loaded module, round trip p50 (target <= 100 µs);
4. cold start: process spawn to the first answer of `initialize` and of `ping` (target p50 <= 100 ms;
   the floors and the .pyc columns come with it, see `bench_path_parts`);
5. pipelined `ping`, 128 in flight, vs the echo in each of `--rounds` rounds (target >= 1.5x in
   every round).

Then the pieces that remain (`bench_path_parts`): the sidecar's own CPU per request without a
round trip, wasmtime-py's floor for an instance, and the floor of a cold start.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import bench_path_parts
from bench_core import PING, WINDOW
from bench_vm import ADD, ASK, GUESTS, create_vm, interleaved, timed, timed_host_call, vm_create_round_trip
from harness import ECHO, FLOOR, ROOT, SIDECAR, Peer, pipelined, summary


def round_trip_rows(calls: int, echoes: int) -> dict[str, list[float]]:
    """Samples of each echo process, of the sidecar's `ping`, `add` and `ask`, and of the floor's
    `add` and `ask` (`floor_server`: the least Python per call in this design), interleaved."""
    peer = Peer(SIDECAR)
    echo_peers = [Peer(ECHO) for _ in range(echoes)]
    floors = {export: Peer([*FLOOR, export]) for export in ("add", "ask")}
    try:
        peer.request("ping")
        numeric = create_vm(peer, {"wat": (GUESTS / "numeric.wat").read_text()})
        asking = create_vm(peer, {"wat": (GUESTS / "abi.wat").read_text()})
        series = {f"echo{index}": timed(echo, PING) for index, echo in enumerate(echo_peers)}
        series |= {
            "ping": timed(peer, PING),
            "add": timed(peer, ADD % (1, numeric.encode())),
            "ask": timed_host_call(peer, ASK % (1, asking.encode())),
            "floor add": timed(floors["add"], ADD % (1, b"floor")),
            "floor ask": timed_host_call(floors["ask"], ASK % (1, b"floor")),
        }
        samples = interleaved(series, calls)
        samples["create"] = vm_create_round_trip(peer, max(300, calls // 3))
        return samples
    finally:
        for echo in [*echo_peers, *floors.values()]:
            echo.close()
        peer.close()


def pipelined_rate(argv: list[str], total: int, root: Path = ROOT) -> float:
    """Requests per second of one fresh process, once it is warm."""
    peer = Peer(argv, root=root)
    try:
        # The sidecar answers before its VM services are imported (~100 ms more on a worker
        # thread, holding the GIL): a VM method's answer says they are in, so the rate is
        # the running sidecar's, not its start's.
        peer.request("vm.list" if argv is SIDECAR else "ping")
        pipelined(peer, 5_000, WINDOW, PING)  # warm-up
        return pipelined(peer, total, WINDOW, PING)
    finally:
        peer.close()


def pipelined_ratios(rounds: int, total: int, baseline: Path | None = None) -> list[list[float]]:
    """Per round, requests per second of the echo, this tree's sidecar and, with `baseline`, that
    checkout's sidecar (say, main's: a before/after of one run); fresh processes each round."""
    return [[pipelined_rate(ECHO, total), pipelined_rate(SIDECAR, total),
             *([pipelined_rate(SIDECAR, total, baseline)] if baseline else [])] for _ in range(rounds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="round trips per latency series")
    parser.add_argument("--echoes", type=int, default=4, help="echo processes; the best p50 is the baseline")
    parser.add_argument("--rounds", type=int, default=5, help="pipelined rounds (fresh processes each)")
    parser.add_argument("--total", type=int, default=50_000, help="requests per pipelined round")
    parser.add_argument("--cold", type=int, default=10, help="cold starts")
    parser.add_argument("--baseline", type=Path, help="another checkout (say, main's) whose sidecar is also "
                        "measured in each pipelined round: a before/after of one run")
    args = parser.parse_args()

    samples = round_trip_rows(args.calls, args.echoes)
    echo_p50s = [statistics.median(samples[f"echo{index}"]) for index in range(args.echoes)]
    best = min(echo_p50s)
    print("round trips, µs (sidecar series interleaved with every echo process)")
    print(f"  echo p50 per process          {', '.join(f'{p50:.1f}' for p50 in echo_p50s)}   best {best:.1f}")
    rows = (("ping", "sidecar ping", None), ("add", "vm.call add(2,40)", 1.3), ("ask", "vm.call + 1 host_call", 2.5),
            ("floor add", "floor: decode, add, answer", None), ("floor ask", "floor: the same + 1 host call", None))
    for name, label, target in rows:
        p50 = statistics.median(samples[name])
        goal = f"  (target <= {target}x)" if target else ""
        print(f"  {label:<29} {summary(samples[name])}   {p50 / best:.2f}x echo best{goal}")
    create = samples["create"]
    print(f"vm.create from a loaded module  {summary(create)}   p50 {statistics.median(create):.0f} µs "
          f"(target <= 100 µs), {statistics.median(create) / best:.2f}x echo best")
    cold = bench_path_parts.cold_start_samples(args.cold)
    for method in ("initialize", "ping"):
        print(f"cold start to first answer of {method:<10} ms  median {statistics.median(cold[method]):.0f}, "
              f"min {min(cold[method]):.0f} over {len(cold[method])} (target <= 100 ms; floors: "
              f"msgspec {statistics.median(cold['msgspec']):.0f}, "
              f"the libraries the daemon serves on {statistics.median(cold['libraries']):.0f})")
    ratios = pipelined_ratios(args.rounds, args.total, args.baseline)
    print(f"pipelined ping, {WINDOW} in flight, {args.total} requests per round (fresh processes)")
    for echo_rate, sidecar_rate, *before in ratios:
        also = "".join(f"   {args.baseline}: {rate:9.0f}/s {rate / echo_rate:.2f}x" for rate in before)
        print(f"  echo {echo_rate:9.0f}/s   sidecar {sidecar_rate:9.0f}/s   {sidecar_rate / echo_rate:.2f}x{also}")
    worst = min(sidecar_rate / echo_rate for echo_rate, sidecar_rate, *_ in ratios)
    print(f"  worst round {worst:.2f}x (target >= 1.5x every round)")
    print("what stands in the way")
    bench_path_parts.report(cold, calls=args.calls, runs=args.cold)


if __name__ == "__main__":
    main()
