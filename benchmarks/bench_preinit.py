"""Pre-initialization: what a `preinit` costs the first time and from the caches, and what the
baked module's copy-on-write memory image saves each time an instance starts.

Run: `python benchmarks/bench_preinit.py [--runs N] [--mib M] [--python DIR | --no-python]`.

1. Over the wire: real `python -m sidecar` processes on a raw pipe (`harness.Peer`), each run with
   a new compile-cache directory. `module.load` with `preinit` the first time (the export runs, the
   source and the baked module compile), again in the same process (the in-memory table), and in a
   fresh process on the same cache (one `deserialize_file` of the baked entry, no source compile).
   Wall-clock round trips as the host sees them, median of `--runs`, with the sidecar's own
   `preinit_ms` and `compile_ms` of the first load.
2. In process, through the sidecar's own `Isolate`: starting an instance of the baked module
   (store, instantiation, guest ABI), against an instance of the plain module into whose memory the
   same state is written (what a `state` snapshot's restore does); and plain wasmtime
   instantiation of the baked module with copy-on-write memory images on and off.

The guests: a synthetic one whose `init` grows memory to `--mib` MiB and fills all of it with
non-zero words, and the CPython runtime (`py_init`, its runtime directory preopened at `/python`)
when one is installed (`wasm-sidecar runtime install python`, or `--python DIR`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, SIDECAR, Peer  # noqa: E402

sys.path.insert(0, str(ROOT))
from protocol.methods import PreinitSpec  # noqa: E402
from sidecar import snapshots  # noqa: E402
from sidecar.engines import Engines, EngineSettings  # noqa: E402
from sidecar.hostcalls import HostCalls  # noqa: E402
from sidecar.isolate import Isolate  # noqa: E402
from sidecar.limits import load_limits  # noqa: E402
from sidecar.modules import INSTRUMENT_ID, CompiledModule, ModuleStore, content_id, instrument_or_keep  # noqa: E402
from sidecar.preinit import Preinit  # noqa: E402
from sidecar.runtime import NotReading, Runtime  # noqa: E402
from sidecar.wasmbin import instrument  # noqa: E402

MiB = 1 << 20
DEFAULT_PYTHON = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "wasm-sidecar/runtimes/python"

SYNTHETIC = """
(module
  (memory (export "memory") 1)
  (global $ready (mut i32) (i32.const 0))
  (func (export "init") (local $at i32) (local $end i32)
    (drop (memory.grow (i32.sub (i32.const PAGES) (memory.size))))
    (local.set $end (i32.mul (memory.size) (i32.const 65536)))
    (loop $fill
      (i32.store (local.get $at) (i32.or (local.get $at) (i32.const 1)))
      (local.set $at (i32.add (local.get $at) (i32.const 4)))
      (br_if $fill (i32.lt_u (local.get $at) (local.get $end))))
    (global.set $ready (i32.const 1)))
  (func (export "ready") (result i32) (global.get $ready))
  (func (export "probe") (param i32) (result i32) (i32.load (local.get 0))))
"""


class Guest:
    def __init__(self, name: str, wasm: bytes, preinit: dict[str, Any], load: dict[str, Any]) -> None:
        self.name = name
        self.wasm = wasm
        self.preinit = preinit  # the wire's `preinit`
        self.load = load  # the wire's module source


def guests(mib: int, python: Path | None) -> list[Guest]:
    text = SYNTHETIC.replace("PAGES", str(mib * 16))
    found = [Guest(f"synthetic, {mib} MiB of non-zero state", bytes(wasmtime.wat2wasm(text)), {"export": "init"},
                   {"wat": text})]
    if python is not None:
        module = python / "python.wasm"
        if module.exists():
            preopens = [{"host_path": str(python), "guest_path": "/python"}]
            found.append(Guest("CPython runtime, py_init", module.read_bytes(),
                               {"export": "py_init", "wasi": {"preopens": preopens}}, {"path": str(module)}))
        else:
            print(f"(no CPython runtime at {python}: install it with `wasm-sidecar runtime install python`)")
    return found


# -- 1. over the wire -------------------------------------------------------------------------------


class Sidecar:
    def __init__(self, cache_dir: Path) -> None:
        self.peer = Peer(SIDECAR, env={"SIDECAR_CACHE_DIR": str(cache_dir)})
        self.call("ping")  # started and reading: the interpreter's start-up is not measured

    def call(self, method: str, params: Any = None) -> tuple[Any, float]:
        """One request's result and its round trip in milliseconds."""
        elapsed_us, result = self.peer.timed_result(method, params)
        return result, elapsed_us / 1000

    def close(self) -> None:
        self.peer.close()


def over_the_wire(guest: Guest, runs: int) -> None:
    params = {**guest.load, "preinit": guest.preinit}
    first, again, fresh, preinit_ms, compile_ms = [], [], [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="bench-preinit-") as cache_dir:
            sidecar = Sidecar(Path(cache_dir))
            try:
                result, elapsed = sidecar.call("module.load", params)
                assert result["preinit_cached"] is False, result
                first.append(elapsed)
                preinit_ms.append(result["preinit_ms"])
                compile_ms.append(result["compile_ms"])
                result, elapsed = sidecar.call("module.load", params)
                assert result["preinit_cached"] is True, result
                again.append(elapsed)
            finally:
                sidecar.close()
            sidecar = Sidecar(Path(cache_dir))
            try:
                result, elapsed = sidecar.call("module.load", params)
                assert result["preinit_cached"] is True and result["cached"] is True, result
                fresh.append(elapsed)
            finally:
                sidecar.close()
    print(f"  module.load with preinit, first time         {ms(first)}"
          f"   (preinit_ms {statistics.median(preinit_ms):.1f}, compile_ms {statistics.median(compile_ms):.1f})")
    print(f"  the same again, same process                 {ms(again)}")
    print(f"  the same in a fresh process (disk cache)     {ms(fresh)}")


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples):9.2f} ms" + (f" (min {min(samples):.2f})" if len(samples) > 1 else "")


# -- 2. in process ------------------------------------------------------------------------------------


def instantiation(guest: Guest, count: int) -> None:
    limits = load_limits({})
    settings = EngineSettings.from_limits(limits)
    runtime = Runtime(HostCalls(limits, lambda _frame: None), NotReading(), lambda _frame: None)
    with tempfile.TemporaryDirectory(prefix="bench-preinit-") as cache_dir, Engines(limits) as engines:
        store = ModuleStore(limits, engines, Path(cache_dir))

        def base() -> CompiledModule:
            return store.load(guest.wasm, settings, transform=instrument_or_keep, transform_id=INSTRUMENT_ID)

        spec = msgspec.convert(guest.preinit, PreinitSpec)
        baked = Preinit(spec, limits, runtime).obtain(store, content_id(guest.wasm), base)
        plain = base()
        instrumented = instrument(plain.wasm)
        first = isolate(baked, runtime, limits)
        memories, globals_ = snapshots.capture(first, instrumented)
        first.close()
        state_mib = sum(image.size_bytes for image in memories) / MiB

        def start_baked() -> Isolate:
            return isolate(baked, runtime, limits)

        def start_and_write() -> Isolate:
            fresh = isolate(plain, runtime, limits, start=False)
            snapshots.apply(fresh, instrumented, memories, globals_, limits)
            return fresh

        print(f"  instance with {state_mib:.1f} MiB of initialized memory, sidecar Isolate ({count} each):")
        print(f"    of the baked module (copy-on-write image)  {us(timed(start_baked, count))}")
        print(f"    of the plain module + the state written    {us(timed(start_and_write, count))}")
        for cow in (True, False):
            config = wasmtime.Config()
            config.memory_init_cow = cow
            engine = wasmtime.Engine(config)
            module = wasmtime.Module(engine, baked.wasm)
            samples = plain_instantiations(engine, module, count)
            print(f"    plain wasmtime, baked, memory_init_cow={cow!s:<5}  {us(samples)}")


def isolate(compiled: CompiledModule, runtime: Runtime, limits: Any, *, start: bool = True) -> Isolate:
    return Isolate("vm-bench", compiled, limits, runtime, lambda _m, _p: -3, start=start)


def timed(start: Callable[[], Isolate], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        instance = start()
        samples.append((time.perf_counter() - began) * 1e6)
        instance.close()
    return samples


def plain_instantiations(engine: wasmtime.Engine, module: wasmtime.Module, count: int) -> list[float]:
    linker = wasmtime.Linker(engine)
    if any(item.module == "wasi_snapshot_preview1" for item in module.imports):
        linker.define_wasi()
    for item in module.imports:
        if item.module == "sidecar":
            func_type = item.type
            assert isinstance(func_type, wasmtime.FuncType)
            linker.define_func("sidecar", item.name or "", func_type, lambda *_args: None)
    samples = []
    for _ in range(count):
        store = wasmtime.Store(engine)
        store.set_wasi(wasmtime.WasiConfig())
        began = time.perf_counter()
        linker.instantiate(store, module)
        samples.append((time.perf_counter() - began) * 1e6)
        store.close()
    return samples


def us(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"p50 {statistics.median(ordered):9.1f} us   p90 {ordered[int(0.9 * len(ordered))]:9.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh cache directories per wire measurement")
    parser.add_argument("--mib", type=int, default=16, help="MiB of state the synthetic guest's init writes")
    parser.add_argument("--count", type=int, default=200, help="instances per in-process measurement")
    parser.add_argument("--python", type=Path, default=DEFAULT_PYTHON, help="a CPython runtime directory")
    parser.add_argument("--no-python", action="store_true", help="only the synthetic guest")
    args = parser.parse_args()
    for guest in guests(args.mib, None if args.no_python else args.python):
        print(guest.name)
        over_the_wire(guest, args.runs)
        instantiation(guest, args.count)


if __name__ == "__main__":
    main()
