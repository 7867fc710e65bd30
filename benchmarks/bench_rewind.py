"""A fresh Python sandbox's CPU, part by part: a new instance per eval against one rewound in place.

Run: `python benchmarks/bench_rewind.py [--runs N]` (numbers go to stdout; nothing is asserted).
Needs the runtime installed (`wasm-sidecar runtime install python`).

In process, through the sidecar's own `Isolate`, `Rewinder` and warm-up, on the runtime's baked
module: what a stateless Python VM does after each eval of `print(1+1)`, timed as CPU of this
thread (`time.thread_time`, what two busy cores run short of) and wall time, median of `--runs`.
- replaced: a new instance (store, instantiation, guest ABI), its warm-up (the no-op eval that takes
  the copy-on-write faults and reseeds `random`), and closing the used one;
- rewound: the used instance's private pages compared and copied back, its globals and WASI
  context reset (`Rewinder`), and the warm-up again (reseeding; the pages are resident now);
- pre-faulted, the alternative not taken: a new instance whose pages that a warm-up writes (found
  once, in /proc/self/pagemap) are made private in bulk, `madvise(MADV_POPULATE_WRITE)` one
  call per run of pages, before its warm-up.
The series alternate in one run, so machine load hits them alike.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))
from protocol.methods import VmCreateParams  # noqa: E402
from sidecar import runtimes  # noqa: E402
from sidecar.engines import Engines, EngineSettings  # noqa: E402
from sidecar.evals import EVAL_EXPORT, runtime_create_params, runtime_warm_up  # noqa: E402
from sidecar.guest_abi import CallState  # noqa: E402
from sidecar.hostcalls import HostCalls  # noqa: E402
from sidecar.isolate import Isolate  # noqa: E402
from sidecar.limits import load_limits  # noqa: E402
from sidecar.modules import INSTRUMENT_ID, ModuleStore, instrument_or_keep  # noqa: E402
from sidecar.preinit import Preinit  # noqa: E402
from sidecar.rewind import Rewinder  # noqa: E402
from sidecar.runtime import NotReading, Runtime  # noqa: E402
from sidecar.wasi_view import wasi_config  # noqa: E402

EVAL = b'{"code": "print(1+1)"}'
_T = TypeVar("_T")
MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14
_libc = ctypes.CDLL(None, use_errno=True)


class Parts:
    """CPU and wall microseconds per named part."""

    def __init__(self) -> None:
        self.cpu: dict[str, list[float]] = {}
        self.wall: dict[str, list[float]] = {}

    def time(self, name: str, work: Callable[[], _T]) -> _T:
        cpu, wall = time.thread_time(), time.perf_counter()
        result = work()
        self.cpu.setdefault(name, []).append((time.thread_time() - cpu) * 1e6)
        self.wall.setdefault(name, []).append((time.perf_counter() - wall) * 1e6)
        return result

    def report(self, title: str) -> None:
        total = sum(statistics.median(samples) for samples in self.cpu.values())
        print(f"{title}: {total:.0f} µs of CPU per sandbox (sum of the parts' medians)")
        for name, samples in self.cpu.items():
            print(f"  {name:<44} CPU p50 {statistics.median(samples):7.1f}  wall p50 "
                  f"{statistics.median(self.wall[name]):7.1f} µs")


def written_runs(isolate: Isolate) -> list[tuple[int, int]]:
    """The [start, stop) addresses of the runs of pages `isolate`'s memory holds privately."""
    memory = isolate.instance.exports(isolate.store)["memory"]
    base = ctypes.addressof(memory.data_ptr(isolate.store).contents)
    pages = memory.data_len(isolate.store) // mmap.PAGESIZE
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        entries = os.pread(fd, pages * 8, base // mmap.PAGESIZE * 8)
    finally:
        os.close(fd)
    flags = entries[7::8]  # the top byte of each little-endian entry: present 0x80, swapped 0x40, file 0x20
    runs: list[tuple[int, int]] = []
    for page, flag in enumerate(flags):
        if flag & 0x40 or (flag & 0x80 and not flag & 0x20):
            start = base + page * mmap.PAGESIZE
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], start + mmap.PAGESIZE)
            else:
                runs.append((start, start + mmap.PAGESIZE))
    return runs


def populate(isolate: Isolate, offsets: list[tuple[int, int]]) -> None:
    memory = isolate.instance.exports(isolate.store)["memory"]
    base = ctypes.addressof(memory.data_ptr(isolate.store).contents)
    for start, stop in offsets:
        if _libc.madvise(ctypes.c_void_p(base + start), ctypes.c_size_t(stop - start), MADV_POPULATE_WRITE):
            raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="sandboxes per series")
    args = parser.parse_args()
    if runtimes.find("python") is None:
        sys.exit("the Python runtime is not installed: wasm-sidecar runtime install python")
    limits = load_limits({})
    settings = EngineSettings.from_limits(limits)
    runtime = Runtime(HostCalls(limits, lambda _frame: None), NotReading(), lambda _frame: None)
    params, source_id = runtime_create_params(VmCreateParams(runtime="python"))  # type: ignore[arg-type]
    warm_up = runtime_warm_up("python")
    assert warm_up is not None
    with tempfile.TemporaryDirectory(prefix="bench-rewind-") as cache_dir, Engines(limits) as engines:
        store = ModuleStore(limits, engines, Path(cache_dir))
        source = Path(params.path).read_bytes()  # type: ignore[arg-type]
        baked = Preinit(params.preinit, limits, runtime).obtain(  # type: ignore[arg-type]
            store, source_id, lambda: store.load(source, settings, transform=instrument_or_keep,
                                                 transform_id=INSTRUMENT_ID))

        def new() -> Isolate:
            return Isolate("vm-bench", baked, limits, runtime, lambda _m, _p: -3, wasi_config(params.wasi))

        def evaluate(isolate: Isolate) -> None:
            state = CallState(input=EVAL, output_cap=limits.vm_output_bytes, deadline=time.monotonic() + 10)
            assert isolate.call(EVAL_EXPORT, [], state, 10_000) == [0] and b'"2\\n"' in state.output

        rewinder = Rewinder("vm-bench", new, lambda: wasi_config(params.wasi), lambda _isolate: None, limits)
        replaced, rewound, prefaulted = Parts(), Parts(), Parts()
        probe = new()
        warm_up(probe)
        base = ctypes.addressof(probe.instance.exports(probe.store)["memory"].data_ptr(probe.store).contents)
        offsets = [(start - base, stop - base) for start, stop in written_runs(probe)]
        probe.close()
        kept = new()
        warm_up(kept)
        for _ in range(args.runs):
            fresh = replaced.time("new instance (store, instantiation, ABI)", new)
            replaced.time("warm-up: first eval (faults, reseeding)", lambda: warm_up(fresh))  # noqa: B023
            replaced.time("the eval, print(1+1)", lambda: evaluate(fresh))  # noqa: B023
            replaced.time("closing it", fresh.close)
            rewound.time("the eval, print(1+1)", lambda: evaluate(kept))
            assert rewound.time("rewind: pages, globals, WASI context", lambda: rewinder.renew(kept))
            rewound.time("warm-up again (reseeding, pages resident)", lambda: warm_up(kept))
            other = prefaulted.time("new instance (store, instantiation, ABI)", new)
            prefaulted.time(f"pre-fault: {len(offsets)} madvise calls", lambda: populate(other, offsets))  # noqa: B023
            prefaulted.time("warm-up: first eval (reseeding)", lambda: warm_up(other))  # noqa: B023
            prefaulted.time("the eval, print(1+1)", lambda: evaluate(other))  # noqa: B023
            prefaulted.time("closing it", other.close)
        kept.close()
        rewinder.close()
    print(f"{args.runs} sandboxes each, alternating, in one process")
    replaced.report("replaced (a new instance per eval)")
    rewound.report("rewound in place")
    prefaulted.report("replaced, pre-faulted in bulk (MADV_POPULATE_WRITE)")


if __name__ == "__main__":
    main()
