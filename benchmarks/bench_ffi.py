"""Per-call and per-instance costs of the sidecar.wasmffi paths against wasmtime-py's own.

Run: `python benchmarks/bench_ffi.py [--runs N]`. Prints µs per operation, best of N runs
(the best run is the one least disturbed by the rest of the machine).

1. Host->guest calls: `Func.__call__` vs `FastCall` for an (i32, i32) -> i32 add and a
   no-argument, no-result export; plus what building a FastCall costs.
2. Store + instantiate (+ close) of a small module, default vs pooling allocator, and the
   same from two threads at once.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import wasmtime
from harness import best_us

try:
    from sidecar.wasmffi import FastCall, enable_pooling
except ImportError:  # run from a source tree that was never installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sidecar.wasmffi import FastCall, enable_pooling

CALLS = """
(module
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "nop")))
"""
SMALL = """
(module
  (memory (export "memory") 1)
  (global (mut i32) (i32.const 0))
  (table 16 funcref)
  (data (i32.const 1024) "some initial data")
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1))))
"""


def bench_calls(runs: int) -> None:
    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, CALLS)
    store = wasmtime.Store(engine)
    try:
        exports = wasmtime.Instance(store, module, []).exports(store)
        add, nop = exports["add"], exports["nop"]
        assert isinstance(add, wasmtime.Func) and isinstance(nop, wasmtime.Func)
        fast_add, fast_nop = FastCall(store, add), FastCall(store, nop)
        args = [1, 2]
        assert add(store, 1, 2) == 3 and fast_add(args) == [3]
        rows = [
            ("add(i32,i32)->i32  Func.__call__", best_us(lambda: add(store, 1, 2), n=20_000, runs=runs)),
            ("add(i32,i32)->i32  FastCall", best_us(lambda: fast_add(args), n=100_000, runs=runs)),
            ("add, unsigned arg  FastCall (slow path)",
             best_us(lambda: fast_add([0xFFFFFFFF, 2]), n=50_000, runs=runs)),
            ("nop()              Func.__call__", best_us(lambda: nop(store), n=20_000, runs=runs)),
            ("nop()              FastCall", best_us(lambda: fast_nop([]), n=100_000, runs=runs)),
            ("FastCall(store, add) construction", best_us(lambda: FastCall(store, add), n=2_000, runs=runs)),
        ]
    finally:
        store.close()
    print(f"host->guest calls (µs per call, best of {runs} runs)")
    for label, us in rows:
        print(f"  {label:42s} {us:8.2f}")


def _engine(pooling: bool) -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = True  # as the sidecar runs it
    if pooling:
        enable_pooling(config, total_core_instances=64, max_memory_size=128 << 20)
    return wasmtime.Engine(config)


def bench_instantiate(runs: int) -> None:
    print(f"store + instantiate + close, small module (µs each, best of {runs} runs)")
    for pooling in (False, True):
        label = "pooling" if pooling else "default"
        created = time.perf_counter()
        engine = _engine(pooling)
        engine_ms = (time.perf_counter() - created) * 1e3
        module = wasmtime.Module(engine, SMALL)

        def cycle(engine: wasmtime.Engine = engine, module: wasmtime.Module = module) -> None:
            store = wasmtime.Store(engine)
            store.set_epoch_deadline(1)
            wasmtime.Instance(store, module, [])
            store.close()

        def store_only(engine: wasmtime.Engine = engine) -> None:
            wasmtime.Store(engine).close()

        one = best_us(cycle, n=3_000, runs=runs)
        bare = best_us(store_only, n=3_000, runs=runs)
        per_thread: list[float] = []

        def worker(per_thread: list[float] = per_thread, cycle: object = cycle) -> None:
            per_thread.append(best_us(cycle, n=3_000, runs=1))

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(
            f"  {label:8s} 1 thread {one:6.1f}  (store alone {bare:4.1f}, so instantiate ~{one - bare:4.1f})"
            f" | 2 threads {max(per_thread):6.1f} each | Engine() {engine_ms:5.2f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="repetitions; the best one is reported")
    runs = parser.parse_args().runs
    bench_calls(runs)
    bench_instantiate(runs)


if __name__ == "__main__":
    main()
