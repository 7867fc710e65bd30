"""Module loading: a first compile against a later process's load from the on-disk compile cache.

Run: `python benchmarks/bench_modules.py [--runs N] [--module PATH ...] [--tree DIR]`. Each
measurement is a fresh process (a cache hit counts only when no in-memory state helps), all sharing
one temporary cache directory: the first process compiles and writes the entry, the next N load it.
A load is what `module.load` / `vm.create` do with a source: read it (or know it by its seal) and
load it through the load-time rewrite, for a module named by path and for the same bytes given
inline (`wasm_base64`, which must be hashed for its id). Beside each, in the same process and on
the same entry, the floor: `Module.deserialize_file` alone (best of 3). Printed: the median and the
range over N processes, and the median ratio to the floor.

`--tree DIR` measures another checkout (e.g. `main`, before a change) with this same client, in
the same run and on the same machine load: the fair before/after.
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


def child(tree: str, module_path: str, cache_dir: str, inline: bool) -> None:
    """One load in this process, then the floor on its entry; prints what they cost as JSON."""
    sys.path.insert(0, tree)
    import wasmtime

    from protocol.methods import ModuleLoadParams
    from sidecar.engines import Engines, EngineSettings
    from sidecar.limits import load_limits
    from sidecar.modules import INSTRUMENT_ID, ModuleStore, instrument_or_keep, read_source

    limits = load_limits({})
    params = ModuleLoadParams(wasm_base64=Path(module_path).read_bytes()) if inline else \
        ModuleLoadParams(path=module_path)
    with Engines(limits) as engines:
        store = ModuleStore(limits, engines, Path(cache_dir))
        settings = EngineSettings.from_limits(limits)
        with engines.lease(settings) as lease:  # the engine exists before the clock starts, as in a sidecar
            started = time.perf_counter()
            # A tree from before `ModuleStore.source` read every source into bytes.
            source = store.source(params) if hasattr(store, "source") else read_source(params, limits)
            compiled = store.load(source, settings, transform=instrument_or_keep, transform_id=INSTRUMENT_ID)
            wall_ms = (time.perf_counter() - started) * 1000
            entry = max(Path(cache_dir).glob("*.cwasm"), key=lambda path: path.stat().st_size)
            floor_ms = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                wasmtime.Module.deserialize_file(lease.engine, str(entry))
                floor_ms = min(floor_ms, (time.perf_counter() - started) * 1000)
    print(json.dumps({"cached": compiled.cached, "wall_ms": wall_ms, "floor_ms": floor_ms,
                      "size": compiled.size_bytes}))


def _load_in_process(tree: str, module_path: str, cache_dir: str, inline: bool = False) -> dict[str, float]:
    env = {**os.environ, "SIDECAR_LOG_LEVEL": "warning", "SIDECAR_CACHE_DIR": cache_dir}
    done = subprocess.run([sys.executable, __file__, "--child", tree, module_path, cache_dir, str(int(inline))],
                          capture_output=True, text=True, check=True, env=env, cwd=tree)
    return json.loads(done.stdout.splitlines()[-1])


def _row(label: str, loads: list[dict[str, float]]) -> str:
    walls = [load["wall_ms"] for load in loads]
    ratio = statistics.median(load["wall_ms"] / load["floor_ms"] for load in loads)
    floor = statistics.median(load["floor_ms"] for load in loads)
    return (f"  {label:<24} median {statistics.median(walls):7.2f} ms  (range {min(walls):.2f}-{max(walls):.2f})"
            f"   floor {floor:5.2f} ms   {ratio:5.1f}x the floor")


def bench(label: str, module_path: str, runs: int, trees: list[str]) -> None:
    for tree in trees:
        with tempfile.TemporaryDirectory(prefix="bench-modules-") as cache_dir:
            cold = _load_in_process(tree, module_path, cache_dir)
            # Interleaved, so that the machine's load falls on both alike.
            pairs = [(_load_in_process(tree, module_path, cache_dir),
                      _load_in_process(tree, module_path, cache_dir, inline=True)) for _ in range(runs)]
            by_path, inline = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
            assert not cold["cached"] and all(load["cached"] for load in by_path + inline), "the cache missed"
            print(f"{label} ({cold['size']:,} bytes), tree {tree}: first compile {cold['wall_ms']:.0f} ms;"
                  f" later processes, {runs} each:")
            print(_row("by path", by_path))
            print(_row("inline bytes", inline))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="later processes per measurement")
    parser.add_argument("--module", action="append", default=None, help="a .wasm file (default: CPython)")
    parser.add_argument("--tree", action="append", default=[], help="another checkout to measure as well")
    parser.add_argument("--child", nargs=4, metavar=("TREE", "MODULE", "CACHE_DIR", "INLINE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tree, module_path, cache_dir, inline = args.child
        child(tree, module_path, cache_dir, inline == "1")
        return
    trees = [str(Path(tree).resolve()) for tree in args.tree] + [str(ROOT)]
    with tempfile.TemporaryDirectory(prefix="bench-modules-small-") as directory:
        small = Path(directory) / "small.wasm"
        import wasmtime

        small.write_bytes(wasmtime.wat2wasm(SMALL_WAT))
        bench("small module", str(small), args.runs, trees)
    modules = args.module or ([str(CPYTHON)] if CPYTHON.exists() else [])
    if not modules:
        print(f"skipped the big module: {CPYTHON} is missing (gitignored; CI provides it)")
    for module in modules:
        bench(Path(module).name, module, args.runs, trees)


if __name__ == "__main__":
    main()
