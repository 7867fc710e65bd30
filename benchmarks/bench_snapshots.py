"""Snapshots of a VM with 64 MiB of mostly-zero memory: file sizes, snapshot and restore times,
a restore in a fresh process against rebuilding the state there, and our `wasm` format against
Wizer's output for the same module and state. Issue 15's two `vm.snapshot` rows (64 MiB mostly
zero, 64 MiB dense) print beside the floors measured in this run by this process: a `ping` round
trip, reading 64 MiB (a zero scan at memory bandwidth), SHA-256 of 64 MiB, and writing the same
number of bytes to a file in the same directory with the fsync the sidecar does.

Run: `python benchmarks/bench_snapshots.py [--runs N] [--pages P] [--wizer PATH | --no-wizer]`.
Every sidecar is a real `python -m sidecar` process on a raw pipe (`harness.Peer`), with its own
temporary compile-cache directory, so a "cold" process really compiles and a "warm" one really
loads from the on-disk cache. Times are wall-clock round trips as the host sees them (median of
`--runs`; each fresh-process figure is one request in each of `--runs` new processes).

Wizer comes from npm (`@bytecodealliance/wizer`, whose platform sub-package ships a Linux binary);
without `--wizer` the script installs it into a temporary directory with
`npm install --prefix`, and says so in its output if that is not possible.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import SIDECAR, Peer  # noqa: E402

MiB = 1 << 20
WIZER_PACKAGE = "@bytecodealliance/wizer"
INIT = "wizer.initialize"

# The same module serves both pre-initializers: `wizer.initialize` grows memory to PAGES pages,
# writes a few bytes far apart (at a quarter, half and the end of it) and sets internal globals;
# the other exports read the state.
GUEST = """
(module
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  (global $seed (mut i64) (i64.const 0))
  (func (export "wizer.initialize")
    (drop (memory.grow (i32.sub (i32.const PAGES) (memory.size))))
    (i64.store (i32.const 1024) (i64.const 0x0123456789abcdef))
    (i32.store (i32.mul (memory.size) (i32.const 16384)) (i32.const 0x5eed))
    (i32.store (i32.mul (memory.size) (i32.const 32768)) (i32.const 0xfeed))
    (i32.store (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 4)) (i32.const 0x600dcafe))
    (global.set $count (i32.const 41))
    (global.set $seed (i64.const -7)))
  (func (export "next") (result i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (global.get $count))
  (func (export "seed") (result i64) (global.get $seed))
  (func (export "pages") (result i32) (memory.size))
  (func (export "fill") (memory.fill (i32.const 0) (i32.const 0x5a) (i32.mul (memory.size) (i32.const 65536))))
  (func (export "probe") (param i32) (result i32) (i32.load (local.get 0))))
"""


class Sidecar:
    """One sidecar process with its own compile cache; `call` times one request."""

    def __init__(self, cache_dir: Path) -> None:
        self.peer = Peer(SIDECAR, env={"SIDECAR_CACHE_DIR": str(cache_dir)})

    def call(self, method: str, params: Any = None) -> tuple[Any, float]:
        """One request's result and its round trip in milliseconds."""
        elapsed_us, result = self.peer.timed_result(method, params)
        return result, elapsed_us / 1000

    def close(self) -> None:
        self.peer.close()


def median(samples: list[float]) -> str:
    return f"{statistics.median(samples):8.2f} ms" + (f"  (min {min(samples):.2f}, max {max(samples):.2f})"
                                                       if len(samples) > 1 else "")


def row(label: str, value: str) -> None:
    print(f"  {label:<58} {value}")


def fresh_process_samples(runs: int, cache_dir: Callable[[], Path], work: Callable[[Sidecar], float]) -> list[float]:
    samples = []
    for _ in range(runs):
        sidecar = Sidecar(cache_dir())
        try:
            sidecar.call("ping")  # started and reading: the interpreter's start-up is not measured
            samples.append(work(sidecar))
        finally:
            sidecar.close()
    return samples


def floor_ms(runs: int, work: Callable[[], object]) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def write_synced(path: Path, data: bytes) -> None:
    """What the sidecar's write costs at least: the bytes to a new file, fsync, rename."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb", buffering=0) as handle:
        handle.write(data)  # unbuffered: one write call for all of it
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def floors(runs: int, size: int, small: int, scratch: Path) -> dict[str, list[float]]:
    """The machine's floors for a snapshot of `size` bytes of memory (a `small` file when sparse)."""
    dense = bytes([0x5A]) * size
    zeros = bytearray(size)  # touched, as a live linear memory's pages are after the first scan
    return {
        "read": floor_ms(runs, lambda: zeros.find(1)),  # memchr over it: reading at memory bandwidth
        "sha256": floor_ms(runs, lambda: hashlib.sha256(dense).digest()),
        "write": floor_ms(runs, lambda: write_synced(scratch / "floor.dense", dense)),
        "write_small": floor_ms(runs, lambda: write_synced(scratch / "floor.small", dense[:small])),
    }


def behaviour(wasm: bytes) -> dict[str, Any]:
    """What a plain wasmtime instance of a pre-initialized module shows (its start never runs)."""
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    instance = wasmtime.Instance(store, wasmtime.Module(engine, wasm), [])
    exports = instance.exports(store)

    def run(name: str, *args: int) -> Any:
        func = exports[name]
        assert isinstance(func, wasmtime.Func)
        return func(store, *args)

    pages = run("pages")
    return {
        "pages": pages,
        "probes": [run("probe", a) for a in (1024, 1028, pages * 16384, pages * 32768, pages * 65536 - 4)],
        "seed": run("seed"),
        "next": [run("next"), run("next")],
    }


def find_wizer(explicit: str | None, scratch: Path) -> tuple[Path | None, str]:
    """The wizer binary and how it was found, or None and why not."""
    if explicit:
        return Path(explicit), f"given: {explicit}"
    on_path = shutil.which("wizer")
    if on_path:
        return Path(on_path), f"on PATH: {on_path}"
    npm = shutil.which("npm")
    if npm is None:
        return None, "npm is not installed, so Wizer could not be installed"
    prefix = scratch / "npm"
    done = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", WIZER_PACKAGE],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return None, f"npm install {WIZER_PACKAGE} failed: {done.stderr.strip()[-300:]}"
    binaries = [p for p in (prefix / "node_modules" / "@bytecodealliance").glob("wizer-*/wizer*") if p.is_file()]
    if not binaries:
        return None, f"{WIZER_PACKAGE} installed but no binary for this platform was found"
    version = subprocess.run(["npm", "ls", "--prefix", str(prefix), WIZER_PACKAGE], capture_output=True, text=True)
    found = next((line.strip() for line in version.stdout.splitlines() if "wizer@" in line), WIZER_PACKAGE)
    return binaries[0], f"npm: {found.split(' ')[-1]} ({binaries[0].parent.name})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pages", type=int, default=1024, help="memory size in 64 KiB pages (1024 = 64 MiB)")
    parser.add_argument("--wizer", help="path to a wizer binary (default: PATH, else npm install)")
    parser.add_argument("--no-wizer", action="store_true")
    args = parser.parse_args()
    guest = GUEST.replace("PAGES", str(args.pages))
    module = bytes(wasmtime.wat2wasm(guest))
    size_mib = args.pages * 65536 / MiB

    with tempfile.TemporaryDirectory(prefix="bench-snapshots-") as scratch_name:
        scratch = Path(scratch_name)
        warm_cache = scratch / "cache"
        fresh = iter(range(1_000_000))

        def cold_cache() -> Path:
            return scratch / f"cold-{next(fresh)}"

        state, ours = scratch / "vm.state", scratch / "ours.wasm"
        module_path = scratch / "guest.wasm"
        module_path.write_bytes(module)

        print(f"VM: {size_mib:.0f} MiB of linear memory, a few bytes written; {args.runs} runs per figure")
        sidecar = Sidecar(warm_cache)
        try:
            sidecar.call("ping")
            loaded, load_ms = sidecar.call("module.load", {"path": str(module_path)})
            vm = sidecar.call("vm.create", {"module_id": loaded["module_id"]})[0]["vm_id"]
            _, init_ms = sidecar.call("vm.call", {"vm_id": vm, "export": INIT})
            snap_ms, wasm_ms, restore_ms, restored = [], [], [], []
            for _ in range(args.runs):
                result, elapsed = sidecar.call("vm.snapshot", {"vm_id": vm, "path": str(state)})
                snap_ms.append(elapsed)
                state_size = result["size_bytes"]
                result, elapsed = sidecar.call("vm.snapshot", {"vm_id": vm, "path": str(ours), "format": "wasm"})
                wasm_ms.append(elapsed)
                wasm_size = result["size_bytes"]
                result, elapsed = sidecar.call("vm.restore", {"path": str(state)})
                restore_ms.append(elapsed)
                restored.append(result["vm_id"])
                sidecar.call("vm.dispose", {"vm_id": result["vm_id"]})
            check, _ = sidecar.call("vm.call", {"vm_id": vm, "export": "probe", "args": [args.pages * 65536 - 4]})
            assert check["results"] == [0x600DCAFE], check
            dense_vm = sidecar.call("vm.create", {"module_id": loaded["module_id"]})[0]["vm_id"]
            sidecar.call("vm.call", {"vm_id": dense_vm, "export": INIT})
            sidecar.call("vm.call", {"vm_id": dense_vm, "export": "fill"})
            dense_ms, ping_ms = [], []
            for _ in range(args.runs):
                ping_ms.append(sidecar.call("ping")[1])
                result, elapsed = sidecar.call("vm.snapshot", {"vm_id": dense_vm, "path": str(scratch / "dense.state")})
                dense_ms.append(elapsed)
                dense_size = result["size_bytes"]
            sidecar.call("vm.dispose", {"vm_id": dense_vm})
            (scratch / "dense.state").unlink()
        finally:
            sidecar.close()

        floor = floors(args.runs, args.pages * 65536, state_size, scratch)
        print("\nIssue 15's vm.snapshot rows, each beside its floor measured in this run")
        row("ping round trip (the request's own cost)", median(ping_ms))
        row(f"read {size_mib:.0f} MiB in this process (memchr: memory bandwidth)", median(floor["read"]))
        row(f"write {state_size} bytes + fsync + rename in this process", median(floor["write_small"]))
        row(f"vm.snapshot, {size_mib:.0f} MiB mostly zero (target <= 10 ms)", median(snap_ms))
        row(f"SHA-256 of {size_mib:.0f} MiB in this process", median(floor["sha256"]))
        row(f"write {size_mib:.0f} MiB + fsync + rename in this process", median(floor["write"]))
        row(f"vm.snapshot, {size_mib:.0f} MiB dense, {dense_size} bytes (target <= 150 ms)", median(dense_ms))
        write_floor = statistics.median(floor["write"])
        row("  dense snapshot / (write + fsync floor)", f"{statistics.median(dense_ms) / write_floor:8.2f}x")
        row("  dense snapshot / (write + fsync + one SHA-256 floor)",
            f"{statistics.median(dense_ms) / (write_floor + statistics.median(floor['sha256'])):8.2f}x")

        print("\nIn one process")
        row("module.load (first in the process: engine + compile)",
            f"{load_ms:8.2f} ms  (compile_ms {loaded['compile_ms']})")
        row(f"vm.call {INIT} (grow to {size_mib:.0f} MiB, write)", f"{init_ms:8.2f} ms")
        row("vm.snapshot format=state", median(snap_ms))
        row("vm.snapshot format=wasm", median(wasm_ms))
        row("vm.restore (same process)", median(restore_ms))
        verdict = "OK, under 1 MiB" if state_size < MiB else "OVER the 1 MiB target"
        row("state file size", f"{state_size:8d} bytes  ({verdict})")
        row("wasm file size", f"{wasm_size:8d} bytes")

        def restore_there(sidecar: Sidecar) -> float:
            result, elapsed = sidecar.call("vm.restore", {"path": str(state)})
            sidecar.call("vm.call", {"vm_id": result["vm_id"], "export": "next"})
            return elapsed

        def create_cold(sidecar: Sidecar) -> float:
            _, elapsed = sidecar.call("vm.create", {"path": str(module_path)})
            return elapsed

        def rebuild_cold(sidecar: Sidecar) -> float:
            result, create = sidecar.call("vm.create", {"path": str(module_path)})
            _, init = sidecar.call("vm.call", {"vm_id": result["vm_id"], "export": INIT})
            return create + init

        def load_wasm_snapshot(sidecar: Sidecar) -> float:
            _, elapsed = sidecar.call("vm.create", {"path": str(ours)})
            return elapsed

        print("\nIn a fresh process (one request per new process)")
        row("vm.restore, module from the on-disk compile cache",
            median(fresh_process_samples(args.runs, lambda: warm_cache, restore_there)))
        row("vm.create, cold (empty cache: compiles)",
            median(fresh_process_samples(args.runs, cold_cache, create_cold)))
        row(f"vm.create + {INIT}, cold (rebuilding the state)",
            median(fresh_process_samples(args.runs, cold_cache, rebuild_cold)))
        row("vm.create of the wasm-format snapshot, cold",
            median(fresh_process_samples(args.runs, cold_cache, load_wasm_snapshot)))

        print("\nAgainst Wizer (same module, same state)")
        wizer, how = (None, "skipped (--no-wizer)") if args.no_wizer else find_wizer(args.wizer, scratch)
        row("wizer", how)
        ours_bytes = ours.read_bytes()
        ours_behaviour = behaviour(ours_bytes)
        if wizer is None:
            print("  Wizer could not be run here: only our output is checked in plain wasmtime.")
            row("ours in plain wasmtime", str(ours_behaviour))
            return
        theirs = scratch / "wizer.wasm"
        started = time.perf_counter()
        done = subprocess.run([str(wizer), str(module_path), "-o", str(theirs), "-f", INIT],
                              capture_output=True, text=True)
        wizer_ms = (time.perf_counter() - started) * 1000
        if done.returncode != 0:
            print(f"  wizer failed: {done.stderr.strip()[-500:]}")
            return
        theirs_bytes = theirs.read_bytes()
        theirs_behaviour = behaviour(theirs_bytes)
        row("wizer output size", f"{len(theirs_bytes):8d} bytes")
        row("our wasm-format output size", f"{len(ours_bytes):8d} bytes  "
            f"({len(ours_bytes) - len(theirs_bytes):+d}: our __sidecar_* exports and {INIT} stay)")
        row("wizer run (process, instantiate + init + write)", f"{wizer_ms:8.2f} ms")
        row("our vm.snapshot format=wasm (VM already initialized)", median(wasm_ms))
        same = ours_behaviour == theirs_behaviour
        row("same behaviour in plain wasmtime", f"{'yes' if same else 'NO'}: {ours_behaviour}")
        if not same:
            row("wizer's behaviour", str(theirs_behaviour))
        # Wizer's output is an ordinary module to us: it loads, runs and snapshots again.
        sidecar = Sidecar(warm_cache)
        try:
            vm = sidecar.call("vm.create", {"path": str(theirs)})[0]["vm_id"]
            again, elapsed = sidecar.call("vm.snapshot", {"vm_id": vm, "path": str(scratch / "again.state")})
            row("wizer output -> vm.create -> vm.snapshot", f"{elapsed:8.2f} ms, {again['size_bytes']} bytes")
        finally:
            sidecar.close()


if __name__ == "__main__":
    os.environ.setdefault("SIDECAR_LOG_LEVEL", "warning")
    main()
