"""What stands between the request path and issue 15's targets: the pieces, measured in this run.

Run: `python benchmarks/bench_path_parts.py` (numbers go to stdout; nothing is asserted); also the
second half of `bench_path.py`'s output.

1. The sidecar's own CPU per request, without a pipe round trip: a daemon served in this process
   (`sidecar.app.build_server` on pipes), each frame handed to its dispatcher on this thread, whose
   answers go straight to the output pipe (one `write` each). A round trip adds to this the host's
   and the kernel's part, which the echo pays as well.
2. The floor of `vm.create` in wasmtime-py: a store and an instance of the same module from a
   linker defined once (what reusing a linker per module would leave), against a new linker with
   the guest ABI's seven functions defined per instance (what each instance costs today).
3. The floor of a cold start: a Python process that imports only the libraries the daemon is built
   on (asyncio, anyio, msgspec, structlog, wasmtime) and answers one line, against a bare one.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import anyio
import wasmtime
from bench_vm import GUESTS
from harness import ROOT, SIDECAR, Peer, best_us

sys.path.insert(0, str(ROOT))
from sidecar import logs  # noqa: E402
from sidecar.app import build_server  # noqa: E402
from sidecar.limits import load_limits  # noqa: E402

PING = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
LIBRARIES = "import asyncio, anyio, msgspec, structlog, wasmtime"


class InProcess:
    """A daemon served on a thread of this process; `handle(frame)` runs one frame on the caller's."""

    def __init__(self) -> None:
        in_r, self._in_w = os.pipe()
        self._out_r, out_w = os.pipe()
        os.set_blocking(self._out_r, False)
        logs.configure({"SIDECAR_LOG_LEVEL": "warning"})  # to stderr, and no info line per vm.create
        self.server = build_server(in_r, out_w, load_limits({}))
        started = threading.Event()

        async def serve() -> None:
            async with anyio.create_task_group() as group:
                await group.start(self.server.run)
                started.set()

        threading.Thread(target=anyio.run, args=(serve,), daemon=True).start()
        started.wait(10)

    def drain(self) -> bytes:
        taken = b""
        while True:
            try:
                taken += os.read(self._out_r, 1 << 20)
            except BlockingIOError:
                return taken

    def answer(self, frame: bytes) -> dict:
        """The result of one request (a slow method answers from the event loop: wait for it)."""
        self.server.dispatcher.handle_line(frame)
        out = b""
        deadline = time.monotonic() + 30
        while not out.endswith(b"\n") and time.monotonic() < deadline:
            time.sleep(0.0005)
            out += self.drain()
        reply = json.loads(out.splitlines()[-1])
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["result"]

    def per_frame_us(self, frame: bytes, count: int, runs: int = 5,
                     after: Callable[[bytes], None] | None = None) -> float:
        """Best median µs of `handle_line(frame)` over `runs` runs; `after(output)` runs untimed."""
        medians = []
        for _ in range(runs):
            times = []
            for index in range(count):
                started = time.perf_counter_ns()
                self.server.dispatcher.handle_line(frame)
                times.append(time.perf_counter_ns() - started)
                if after is not None:
                    after(self.drain())
                elif index % 100 == 0:
                    self.drain()
            self.drain()
            medians.append(statistics.median(times) / 1000)
        return min(medians)


def dispatch_costs(count: int) -> dict[str, float]:
    daemon = InProcess()
    wat = (GUESTS / "numeric.wat").read_text()
    numeric = daemon.answer(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "vm.create",
                                        "params": {"wat": wat}}).encode())["vm_id"]
    module_id = daemon.answer(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "module.load",
                                          "params": {"wat": (GUESTS / "abi.wat").read_text()}}).encode())["module_id"]
    add = b'{"jsonrpc":"2.0","id":1,"method":"vm.call","params":{"vm_id":"%s","export":"add","args":[2,40]}}'
    create = b'{"jsonrpc":"2.0","id":1,"method":"vm.create","params":{"module_id":"%s"}}' % module_id.encode()

    def dispose(output: bytes) -> None:
        vm_id = json.loads(output.splitlines()[-1])["result"]["vm_id"]
        daemon.server.dispatcher.handle_line(
            b'{"jsonrpc":"2.0","id":2,"method":"vm.dispose","params":{"vm_id":"%s"}}' % vm_id.encode())
        daemon.drain()

    return {
        "ping": daemon.per_frame_us(PING, count),
        "add": daemon.per_frame_us(add % numeric.encode(), count),
        "create": daemon.per_frame_us(create, max(200, count // 10), after=dispose),
    }


def instantiation_floor(count: int) -> tuple[float, float]:
    """(µs for store + instance from a linker defined once, µs with a new linker and the ABI's
    seven host functions defined per instance), for `abi.wat` on a default engine."""
    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, (GUESTS / "abi.wat").read_text())
    imports = [(item.module, item.name, item.type) for item in module.imports]

    def defined() -> wasmtime.Linker:
        linker = wasmtime.Linker(engine)
        for module_name, name, func_type in imports:
            results = len(func_type.results)
            linker.define_func(module_name, name, func_type, lambda *_, n=results: 0 if n else None)
        return linker

    shared = defined()

    def reused() -> None:
        store = wasmtime.Store(engine)
        shared.instantiate(store, module)
        store.close()

    def fresh() -> None:
        store = wasmtime.Store(engine)
        linker = defined()
        linker.instantiate(store, module)
        linker.close()
        store.close()

    return best_us(reused, n=count, runs=5), best_us(fresh, n=count, runs=5)


def first_line_ms(argv: list[str], runs: int) -> float:
    """Median ms from spawning `argv` to the first line it writes."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stdin is not None
        proc.stdout.readline()
        times.append((time.perf_counter() - started) * 1000)
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()
    return statistics.median(times)


def cold_start_with_bytecode_ms(runs: int) -> float:
    """Median ms to the sidecar's first answer when its modules' .pyc files exist (as an installed
    wheel has them), for an environment that sets PYTHONDONTWRITEBYTECODE."""
    with tempfile.TemporaryDirectory(prefix="bench-pyc-") as prefix:
        env = {"PYTHONPYCACHEPREFIX": prefix}
        Peer(SIDECAR, {**env, "PYTHONDONTWRITEBYTECODE": ""}).close()  # writes them once
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            peer = Peer(SIDECAR, env)
            peer.request("ping")
            times.append((time.perf_counter() - started) * 1000)
            peer.close()
        return statistics.median(times)


def report(cold_ms: float | None = None, calls: int = 2000, runs: int = 10) -> None:
    costs = dispatch_costs(calls)
    print("the sidecar's own CPU per request, in process, no round trip (µs, best median of 5 runs)")
    print(f"  ping {costs['ping']:.1f}   vm.call add {costs['add']:.1f} (+{costs['add'] - costs['ping']:.1f} over ping)"
          f"   vm.create from a module_id {costs['create']:.0f}")
    reused, fresh = instantiation_floor(max(200, calls // 10))
    print(f"wasmtime-py, abi.wat: store + instance from a linker defined once {reused:.1f} µs; "
          f"with a new linker and 7 host functions per instance {fresh:.1f} µs")
    bare = first_line_ms([sys.executable, "-c", "print()"], runs)
    libraries = first_line_ms([sys.executable, "-c", f"{LIBRARIES}; print()"], runs)
    print(f"cold start floor (median of {runs}): bare python {bare:.0f} ms; python importing the libraries "
          f"({LIBRARIES.removeprefix('import ')}) {libraries:.0f} ms"
          + (f"; the sidecar's first answer {cold_ms:.0f} ms" if cold_ms is not None else ""))
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):  # this tree's modules are compiled at every start
        print(f"  PYTHONDONTWRITEBYTECODE is set here: with the .pyc files an installed wheel has, the sidecar's "
              f"first answer takes {cold_start_with_bytecode_ms(runs):.0f} ms")


if __name__ == "__main__":
    report()
