"""Issue 3 benchmark: what a guest call costs through the sidecar, against baselines of the same run.

Run: `python benchmarks/bench_vm.py [--calls N] [--runs N] [--skip-cpython]` (numbers go to stdout;
nothing is asserted). Latencies are microseconds unless marked ms.

Baselines, measured in this run:
- the echo process round trip (`ECHO`): the least any Python NDJSON peer costs per message;
- the same `add` export called in this process with wasmtime-py (`Func.__call__`) and with
  `sidecar.wasmffi.FastCall`: what the guest call itself costs, without any protocol.

Measured:
1. `vm.call` round trip of `add(2, 40)` (target p50 <= 2x echo, aim 1.5x);
2. a `vm.call` whose guest makes one `host_call` that this script answers (target p50 <= 4x echo);
3. `vm.create` from a loaded module (target p50 <= 500 µs);
4. a fresh CPython `print(1+1)` via `vm.run` (target p50 <= 45 ms), sampled alternately with the
   same command run in this process by wasmtime-py on an engine configured like the sidecar's
   (epoch interruption on): the floor any host of this guest pays on this machine;
5. `module.load` of the 20 MB CPython module: the first compile, then a second process reading
   the compile cache (target <= 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import msgspec
import wasmtime
from harness import ECHO, ROOT, SIDECAR, Peer, best_us, percentile, summary

sys.path.insert(0, str(ROOT))  # run from a source tree: `sidecar` and `tests.assets` importable

from sidecar.wasmffi import FastCall  # noqa: E402
from tests.assets.cpython import cpython_wasm  # noqa: E402

GUESTS = ROOT / "tests" / "guests"
ADD = b'{"jsonrpc":"2.0","id":%d,"method":"vm.call","params":{"vm_id":"%s","export":"add","args":[2,40]}}\n'
ASK = b'{"jsonrpc":"2.0","id":%d,"method":"vm.call","params":{"vm_id":"%s","export":"ask","input":"{}"}}\n'


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x"


def ok(reply: dict) -> dict:
    if "error" in reply:
        raise RuntimeError(f"the sidecar refused: {reply['error']}")
    return reply["result"]


def in_process(calls: int, runs: int) -> tuple[float, float]:
    """`add(2, 40)` through wasmtime-py and through FastCall, µs per call, no protocol at all."""
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    try:
        module = wasmtime.Module(engine, (GUESTS / "numeric.wat").read_text())
        add = wasmtime.Instance(store, module, []).exports(store)["add"]
        assert isinstance(add, wasmtime.Func)
        fast = FastCall(store, add, name="add")
        assert add(store, 2, 40) == 42 and fast([2, 40]) == [42]
        args = [2, 40]
        return (
            best_us(lambda: add(store, 2, 40), n=calls, runs=runs),
            best_us(lambda: fast(args), n=calls, runs=runs),
        )
    finally:
        store.close()


def create_vm(peer: Peer, params: dict) -> str:
    return ok(peer.request("vm.create", params))["vm_id"]


def timed(peer: Peer, frame: bytes) -> Callable[[], float]:
    """One round trip of `frame`, in µs."""

    def once() -> float:
        started = time.perf_counter()
        peer.send(frame)
        peer.read_lines(1)
        return (time.perf_counter() - started) * 1e6

    return once


def timed_host_call(peer: Peer, frame: bytes) -> Callable[[], float]:
    """vm.call out, host.call in, our answer out, vm.call's answer in, in µs. The host does what
    it must and no more inside the timing (decodes the request for its id, with msgspec as a fast
    host would); the answer is checked after: the echo baseline decodes nothing either."""

    def once() -> float:
        started = time.perf_counter()
        peer.send(frame)
        request = msgspec.json.decode(peer.read_lines(1)[0])
        if request.get("method") != "host.call":
            raise RuntimeError(f"expected host.call, got {request}")
        peer.send(b'{"jsonrpc":"2.0","id":%s,"result":{"v":1}}\n' % msgspec.json.encode(request["id"]))
        line = peer.read_lines(1)[0]
        elapsed = (time.perf_counter() - started) * 1e6
        reply = json.loads(line)
        if ok(reply)["output"] != '{"v":1}':
            raise RuntimeError(f"unexpected answer {reply}")
        return elapsed

    return once


def interleaved(series: dict[str, Callable[[], float]], calls: int, block: int = 150) -> dict[str, list[float]]:
    """`calls` samples of each series, taken in alternating blocks of `block` calls (after one
    block each of warm-up). On a machine whose speed drifts over seconds, this keeps a slow
    phase from landing on one series only: every ratio compares samples of the same moments."""
    samples: dict[str, list[float]] = {name: [] for name in series}
    for once in series.values():
        for _ in range(block):
            once()
    while any(len(taken) < calls for taken in samples.values()):
        for name, once in series.items():
            samples[name].extend(once() for _ in range(min(block, calls - len(samples[name]))))
            time.sleep(0.001)  # let a spinning reader settle before the next series
    return samples


def vm_create_round_trip(peer: Peer, count: int) -> list[float]:
    module_id = ok(peer.request("module.load", {"wat": (GUESTS / "abi.wat").read_text()}))["module_id"]
    frame = b'{"jsonrpc":"2.0","id":1,"method":"vm.create","params":{"module_id":"%s"}}\n' % module_id.encode()
    times = []
    for index in range(count + count // 5):
        started = time.perf_counter()
        peer.send(frame)
        reply = json.loads(peer.read_lines(1)[0])
        elapsed = (time.perf_counter() - started) * 1e6
        ok(peer.request("vm.dispose", {"vm_id": ok(reply)["vm_id"]}, request_id=2))  # not timed
        if index >= count // 5:
            times.append(elapsed)
    return times


def direct_cpython_run(path: str) -> Callable[[], float]:
    """`python -c print(1+1)` in this process, fresh store and instance per run, ms: no sidecar."""
    config = wasmtime.Config()
    config.epoch_interruption = True  # as every sidecar engine: the guest's code checks the epoch
    engine = wasmtime.Engine(config)
    module = wasmtime.Module.from_file(engine, path)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()

    def once() -> float:
        started = time.perf_counter()
        store = wasmtime.Store(engine)
        store.set_epoch_deadline(1 << 40)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["python", "-c", "print(1+1)"]
        out = bytearray()
        wasi.stdout_custom = out.extend
        store.set_wasi(wasi)
        try:
            linker.instantiate(store, module).exports(store)["_start"](store)
        except wasmtime.ExitTrap as exited:
            assert exited.code == 0, exited
        finally:
            store.close()
        assert out == b"2\n", out
        return (time.perf_counter() - started) * 1000

    return once


def cpython_runs(runs: int, cache_dir: str) -> tuple[float, float, dict[str, list[float]]]:
    """(first compile s, second process's cached load s, ms per run of print(1+1): `vm.run`
    and the in-process baseline, sampled alternately)."""
    path = str(cpython_wasm())
    env = {"SIDECAR_CACHE_DIR": cache_dir}
    first = Peer(SIDECAR, env)
    try:
        started = time.perf_counter()
        loaded = ok(first.request("module.load", {"path": path}))
        compile_s = time.perf_counter() - started
        assert loaded["cached"] is False, "the cache directory was not empty"
    finally:
        first.close()
    second = Peer(SIDECAR, env)
    try:
        second.request("ping")  # started and serving: time the load only
        started = time.perf_counter()
        loaded = ok(second.request("module.load", {"path": path}))
        cached_s = time.perf_counter() - started
        assert loaded["cached"] is True, loaded
        vm_id = create_vm(second, {"module_id": loaded["module_id"], "wasi": {"args": ["python"]}})
        frame = (
            b'{"jsonrpc":"2.0","id":1,"method":"vm.run","params":{"vm_id":"%s","args":["-c","print(1+1)"]}}\n'
            % vm_id.encode()
        )
        reply = json.loads((second.send(frame), second.read_lines(1)[0])[1])
        assert ok(reply)["stdout"] == "2\n", reply
        sidecar_us = timed(second, frame)
        series = {"vm.run": lambda: sidecar_us() / 1000, "direct": direct_cpython_run(path)}
        return compile_s, cached_s, interleaved(series, runs, block=1)
    finally:
        second.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="round trips per latency series")
    parser.add_argument("--runs", type=int, default=5, help="runs of the in-process baselines (best is kept)")
    parser.add_argument("--cpython-runs", type=int, default=20, help="vm.run print(1+1) runs")
    parser.add_argument("--skip-cpython", action="store_true", help="skip the 20 MB CPython measurements")
    args = parser.parse_args()

    func_us, fast_us = in_process(20_000, args.runs)

    with tempfile.TemporaryDirectory(prefix="bench-vm-cache-") as cache_dir:
        peer = Peer(SIDECAR, {"SIDECAR_CACHE_DIR": cache_dir})
        echo_peer = Peer(ECHO)
        try:
            ping_frame = b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n'
            peer.request("ping")
            numeric = create_vm(peer, {"wat": (GUESTS / "numeric.wat").read_text()})
            asking = create_vm(peer, {"wat": (GUESTS / "abi.wat").read_text()})
            inside = [ok(peer.request("vm.call", {"vm_id": numeric, "export": "add", "args": [2, 40]}))["elapsed_ms"]
                      * 1000 for _ in range(500)]
            latency = interleaved({
                "echo": timed(echo_peer, ping_frame),
                "ping": timed(peer, ping_frame),
                "add": timed(peer, ADD % (1, numeric.encode())),
                "ask": timed_host_call(peer, ASK % (1, asking.encode())),
            }, args.calls)
            create = vm_create_round_trip(peer, max(200, args.calls // 5))
        finally:
            echo_peer.close()
            peer.close()
        echo, ping, add, ask = latency["echo"], latency["ping"], latency["add"], latency["ask"]
        echo_p50 = statistics.median(echo)
        add_p50, ask_p50, create_p50 = statistics.median(add), statistics.median(ask), statistics.median(create)
        print("baselines (µs; the round trips below were sampled in alternating blocks with the echo)")
        print(f"  echo process round trip       {summary(echo)}")
        print(f"  in-process Func.__call__      {func_us:.1f} per call")
        print(f"  in-process FastCall           {fast_us:.1f} per call")
        print("vm.call add(2, 40) round trip (µs)")
        print(f"  sidecar ping, for reference   {summary(ping)}   ({ratio(statistics.median(ping), echo_p50)} echo)")
        print(f"  wasm-sidecar                  {summary(add)}")
        print(f"  of which in the guest call    {summary(inside)}   (the sidecar's own elapsed_ms)")
        print(
            f"  p50 vs echo {ratio(add_p50, echo_p50)} (target <= 2x, aim 1.5x); "
            f"p90 vs echo p90 {ratio(percentile(add, 0.9), percentile(echo, 0.9))}; "
            f"over the in-process FastCall call: +{add_p50 - fast_us:.1f}"
        )
        print("vm.call with one host_call answered by this script (µs, two round trips on the pipe)")
        print(f"  wasm-sidecar                  {summary(ask)}")
        print(f"  p50 vs echo {ratio(ask_p50, echo_p50)} (target <= 4x)")
        print("vm.create from a loaded module, round trip (µs)")
        print(f"  wasm-sidecar                  {summary(create)}")
        print(f"  p50 {create_p50:.0f} µs (target <= 500 µs), {ratio(create_p50, echo_p50)} echo")

        if args.skip_cpython:
            return
        compile_s, cached_s, runs = cpython_runs(args.cpython_runs, cache_dir)
    print("CPython 3.11 WASI (20 MB)")
    print(f"  module.load, first compile    {compile_s:.2f} s")
    print(
        f"  module.load, second process   {cached_s * 1000:.1f} ms from the compile cache (target <= 0.5 s), "
        f"{compile_s / cached_s:.0f}x faster than compiling"
    )
    vm_run, direct = runs["vm.run"], runs["direct"]
    print(f"  vm.run print(1+1), ms         {summary(vm_run)} over {len(vm_run)} runs (target p50 <= 45 ms)")
    print(f"  in-process wasmtime-py, ms    {summary(direct)}   (same command, engine like the sidecar's)")
    print(f"  the sidecar adds              {statistics.median(vm_run) - statistics.median(direct):+.1f} ms at p50")


if __name__ == "__main__":
    main()
