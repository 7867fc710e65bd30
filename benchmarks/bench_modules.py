"""Module loading: a first compile against a later process's load from the on-disk compile cache.

Run: `python benchmarks/bench_modules.py [--runs N] [--module PATH ...]`. Each measurement is
a fresh process (a cache hit counts only when no in-memory state helps), all sharing one
temporary cache directory: the first process compiles and writes the entry, the next N load it.
Prints the store's `compile_ms` (compile, or verify + deserialize on a hit), the whole
`ModuleStore.load` wall time (adding hashing the module id, parsing sections, describing
exports), and the cold/warm ratio, for a small module and the CPython WASI build when present.
Then, for the cached CPython artifact, `Module.deserialize_file` against `Module.deserialize`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPYTHON = ROOT / "tests" / "assets" / "cache" / "python-3.11.3.wasm"
SMALL_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "_start")))
"""


def child(module: str, cache_dir: str) -> None:
    """One load in this process; prints what it cost as JSON."""
    sys.path.insert(0, str(ROOT))
    import wasmtime

    from sidecar.engines import Engines, EngineSettings
    from sidecar.limits import load_limits
    from sidecar.modules import ModuleStore

    wasm = bytes(wasmtime.wat2wasm(SMALL_WAT)) if module == "small" else Path(module).read_bytes()
    limits = load_limits({})
    with Engines(limits) as engines:
        store = ModuleStore(limits, engines, Path(cache_dir))
        started = time.perf_counter()
        compiled = store.load(wasm, EngineSettings.from_limits(limits))
        wall_ms = (time.perf_counter() - started) * 1000
    print(json.dumps({"cached": compiled.cached, "compile_ms": compiled.compile_ms, "wall_ms": wall_ms,
                      "size": compiled.size_bytes}))


def _load_in_process(module: str, cache_dir: str) -> dict[str, float]:
    env = {**os.environ, "SIDECAR_LOG_LEVEL": "warning"}
    done = subprocess.run([sys.executable, __file__, "--child", module, cache_dir], capture_output=True,
                          text=True, check=True, env=env, cwd=ROOT)
    return json.loads(done.stdout.splitlines()[-1])


def bench(label: str, module: str, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-modules-") as cache_dir:
        cold = _load_in_process(module, cache_dir)
        warm = [_load_in_process(module, cache_dir) for _ in range(runs)]
        assert not cold["cached"] and all(w["cached"] for w in warm), "the cache did not serve the later loads"
        warm_compile = statistics.median(w["compile_ms"] for w in warm)
        warm_wall = statistics.median(w["wall_ms"] for w in warm)
        print(f"{label} ({cold['size']:,} bytes)")
        print(f"  first compile          compile_ms {cold['compile_ms']:10.2f}   load {cold['wall_ms']:10.2f} ms")
        print(f"  later process, cached  compile_ms {warm_compile:10.2f}   load {warm_wall:10.2f} ms"
              f"   (median of {runs})")
        print(f"  ratio                  compile_ms {cold['compile_ms'] / warm_compile:10.0f}x  "
              f"load {cold['wall_ms'] / warm_wall:10.0f}x")
        if module != "small":
            _deserialize_paths(cache_dir, runs)


def _deserialize_paths(cache_dir: str, runs: int) -> None:
    """Why entries are mapped with deserialize_file rather than read and passed as bytes."""
    sys.path.insert(0, str(ROOT))
    import wasmtime

    from sidecar.engines import EngineSettings
    from sidecar.limits import load_limits

    [entry] = Path(cache_dir).glob("*.cwasm")
    engine = wasmtime.Config()
    engine.epoch_interruption = True
    engine.max_wasm_stack = EngineSettings.from_limits(load_limits({})).stack_bytes
    engine = wasmtime.Engine(engine)
    data = entry.read_bytes()
    best_file = best_bytes = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        wasmtime.Module.deserialize_file(engine, str(entry))
        best_file = min(best_file, time.perf_counter() - started)
        started = time.perf_counter()
        wasmtime.Module.deserialize(engine, data)  # the trailer after the artifact is ignored
        best_bytes = min(best_bytes, time.perf_counter() - started)
    print(f"  deserialize_file {best_file * 1000:.2f} ms, deserialize(bytes) {best_bytes * 1000:.2f} ms"
          f" (best of {runs}, {len(data) / 2**20:.1f} MiB entry)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="cached loads to take the median of")
    parser.add_argument("--module", action="append", default=None, help="a .wasm file (default: CPython)")
    parser.add_argument("--child", nargs=2, metavar=("MODULE", "CACHE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    bench("small module", "small", args.runs)
    modules = args.module or ([str(CPYTHON)] if CPYTHON.exists() else [])
    if not modules:
        print(f"skipped the big module: {CPYTHON} is missing (gitignored; CI provides it)")
    for module in modules:
        bench(Path(module).name, module, args.runs)


if __name__ == "__main__":
    main()
