"""What stands between the request path and issue 15's targets: the pieces, measured in this run.

Run: `python benchmarks/bench_path_parts.py` (numbers go to stdout; nothing is asserted); also the
second half of `bench_path.py`'s output.

1. The sidecar's own CPU per request, without a pipe round trip: a daemon served in this process
   (`sidecar.app.build_server` on pipes), each frame handed to its dispatcher on this thread, whose
   answers go straight to the output pipe (one `write` each). A round trip adds to this the host's
   and the kernel's part, which the echo pays as well.
2. `vm.create` from a loaded module in this process, through the registry (`VmService`) without the
   dispatcher: µs until its answer is decided (what a reply sends at once) and in all, with the spare
   instance (`sidecar.spares`, made after the answer) and without; the two series alternate.
3. The floor of `vm.create` in wasmtime-py: a store and an instance of the same module from a
   linker defined once (what reusing a linker per module would leave), against a new linker with
   the guest ABI's seven functions defined per instance (what each instance costs today).
4. The cold start, sampled in interleaved rounds so every column saw the same load: spawn to the
   first answer of `initialize` (as a host sends it) and of `ping`, with and without this tree's
   .pyc files; then to the answer of a `vm.create` sent right after `initialize` (the VM services,
   wasmtime beneath them, load once the session serves). Beside them the floors: a bare Python
   process answering one line, one that imports msgspec (all the first answer is built on besides
   the standard library), one that imports the libraries the daemon serves on (asyncio, anyio,
   msgspec, structlog: the first answer's floor until it came before the event loop), and one
   that imports wasmtime as well (the floor before issue 15). `--baseline DIR` samples the same
   columns for another checkout (say, main's) in the same rounds: a before/after of one run.
5. The cold start's timeline (`--timeline N` runs, .pyc): from spawn to the moments the sidecar's
   own log events carry (held until structlog is set up, they keep the moment they happened):
   `sidecar_started` (the intake starts), `host_identified` (`initialize` handled), the answer as
   the host read it, `services_loaded` (wasmtime and the VM services in), a `vm.create`'s answer.

Run only the cold start: `python benchmarks/bench_path_parts.py --cold 10 [--baseline DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import anyio
import wasmtime
from bench_vm import ADD, ASK, GUESTS, create_vm, timed, timed_host_call
from harness import ECHO, FLOOR, ROOT, SIDECAR, Peer, best_us

sys.path.insert(0, str(ROOT))
from protocol.methods import VmCreateParams, VmDisposeParams  # noqa: E402
from sidecar import logs  # noqa: E402
from sidecar.app import build_server  # noqa: E402
from sidecar.engines import Engines  # noqa: E402
from sidecar.hostcalls import HostCalls  # noqa: E402
from sidecar.limits import load_limits  # noqa: E402
from sidecar.modules import ModuleStore  # noqa: E402
from sidecar.runtime import NotReading, Runtime  # noqa: E402
from sidecar.vms import VmService  # noqa: E402

PING = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
LIBRARIES = "import asyncio, anyio, msgspec, structlog"  # what the daemon serves on
FIRST_ANSWER_LIBRARIES = "import msgspec"  # what the first answer is built on (and the standard library)
INITIALIZE = {"protocol_version": 1, "client": {"name": "bench", "version": "0"}}
VM_CREATE = {"wat": '(module (func (export "f")))'}


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
                await self.server.services_loaded()
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


def _task_counters(pid: int) -> tuple[int, int]:
    """(CPU ns, context switches) summed over a process's threads, from /proc."""
    cpu = switches = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as sched, open(f"/proc/{pid}/task/{tid}/status") as status:
                cpu += int(sched.read().split()[0])
                switches += sum(int(line.split()[1]) for line in status if "ctxt_switches:" in line)
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return cpu, switches


def cpu_per_request(calls: int) -> dict[str, tuple[float, float]]:
    """Per round trip, in the real processes: (CPU µs of the whole serving process, its context
    switches). The sidecar runs with
    `runner_input_spin_us` 0, so its CPU is its work and not its wait for the next frame; the
    echo and the floor (`floor_server`) block in `read` as well. Unlike a latency, a CPU figure
    hardly moves with the machine's load: it says how much the serving side does per request."""
    spin_off = {"SIDECAR_RUNNER_INPUT_SPIN_US": "0"}
    peers = {"echo": Peer(ECHO), "floor add": Peer([*FLOOR, "add"]), "floor ask": Peer([*FLOOR, "ask"]),
             "sidecar": Peer(SIDECAR, spin_off)}
    try:
        sidecar = peers["sidecar"]
        numeric = create_vm(sidecar, {"wat": (GUESTS / "numeric.wat").read_text()}).encode()
        asking = create_vm(sidecar, {"wat": (GUESTS / "abi.wat").read_text()}).encode()
        series = {
            "echo": (peers["echo"], timed(peers["echo"], PING + b"\n")),
            "floor add": (peers["floor add"], timed(peers["floor add"], ADD % (1, b"floor"))),
            "floor ask": (peers["floor ask"], timed_host_call(peers["floor ask"], ASK % (1, b"floor"))),
            "ping": (sidecar, timed(sidecar, PING + b"\n")),
            "add": (sidecar, timed(sidecar, ADD % (1, numeric))),
            "ask": (sidecar, timed_host_call(sidecar, ASK % (1, asking))),
        }
        found = {}
        for name, (peer, once) in series.items():
            for _ in range(300):
                once()
            before = _task_counters(peer.proc.pid)
            for _ in range(calls):
                once()
            after = _task_counters(peer.proc.pid)
            found[name] = ((after[0] - before[0]) / calls / 1000, (after[1] - before[1]) / calls)
        return found
    finally:
        for peer in peers.values():
            peer.close()


class _Noted:
    """A `vm.create`'s completion that notes when its answer is decided, as a reply would send it."""

    id = 1
    method = "vm.create"
    on_cancel = None

    def __init__(self) -> None:
        self.done = False
        self.answered_ns = 0
        self.value: object = None

    def result(self, value: object) -> None:
        self.value, self.done = value, True

    def error(self, error: Exception) -> None:
        raise error

    def result_of(self, commit: Callable[[], object]) -> bool:
        self.value, self.done = commit(), True
        self.answered_ns = time.perf_counter_ns()
        return True


def create_breakdown(count: int, rounds: int = 5) -> dict[str, tuple[float, float]]:
    """{"spares" | "no spares": (median µs to the answer, median µs in all)} of `vm.create` from a
    loaded `abi.wat`, through `VmService` in this process (each VM disposed, untimed); `rounds`
    alternating blocks of `count` per series."""
    wasm = wasmtime.wat2wasm((GUESTS / "abi.wat").read_text())
    samples: dict[str, tuple[list[float], list[float]]] = {}
    services = {}
    with tempfile.TemporaryDirectory(prefix="bench-create-") as cache_dir:
        for name, env in (("spares", {}), ("no spares", {"SIDECAR_RUNNER_SPARE_INSTANCES": "0"})):
            limits = load_limits(env)
            engines = Engines(limits)
            engines.start()
            runtime = Runtime(HostCalls(limits, lambda _frame: None), NotReading(), lambda _frame: None)
            vms = VmService(limits, runtime, ModuleStore(limits, engines, Path(cache_dir)), engines)
            params = VmCreateParams(module_id=vms.compile(wasm, limits).module_id)
            services[name] = (vms, params)
            samples[name] = ([], [])
        for _ in range(rounds):
            for name, (vms, params) in services.items():
                for index in range(count + 20):  # the first 20 warm up
                    noted = _Noted()
                    started = time.perf_counter_ns()
                    vms.vm_create(params, noted)
                    ended = time.perf_counter_ns()
                    vms.vm_dispose(VmDisposeParams(vm_id=noted.value.vm_id))  # type: ignore[attr-defined]
                    if index >= 20:
                        samples[name][0].append((noted.answered_ns - started) / 1000)
                        samples[name][1].append((ended - started) / 1000)
        for vms, _ in services.values():
            anyio.run(vms.close)
    return {name: (statistics.median(answer), statistics.median(total)) for name, (answer, total) in samples.items()}


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


def first_line_ms(argv: list[str]) -> float:
    """Ms from spawning `argv` to the first line it writes."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdout.readline()
    elapsed = (time.perf_counter() - started) * 1000
    proc.stdin.close()
    proc.wait(10)
    proc.stdout.close()
    return elapsed


def first_answers_ms(method: str, env: dict[str, str] | None = None, root: Path = ROOT) -> tuple[float, float]:
    """Ms from spawning the sidecar (of the tree at `root`) to its answer to `method`, and to the
    answer of a `vm.create` sent once that came."""
    started = time.perf_counter()
    peer = Peer(SIDECAR, env, root=root)
    try:
        answer = peer.request(method, INITIALIZE if method == "initialize" else None)
        first = (time.perf_counter() - started) * 1000
        created = peer.request("vm.create", VM_CREATE, request_id=2)
        assert "result" in answer and "result" in created, (answer, created)
        return first, (time.perf_counter() - started) * 1000
    finally:
        peer.close()


def cold_start_samples(runs: int, baseline: Path | None = None) -> dict[str, list[float]]:
    """Each column once per round, `runs` rounds (`baseline`'s columns too, if given). The .pyc
    columns (as an installed wheel has them: pip compiles at install) read each tree's bytecode
    from a prefix written once here, since PYTHONDONTWRITEBYTECODE may be set (it is in the Docker
    image and on the target machine)."""
    trees = {"": ROOT} | ({"main ": baseline} if baseline is not None else {})
    with tempfile.TemporaryDirectory(prefix="bench-pyc-") as prefix:
        compiled = {"PYTHONPYCACHEPREFIX": prefix}
        for root in trees.values():
            first_answers_ms("initialize", {**compiled, "PYTHONDONTWRITEBYTECODE": ""}, root)  # writes them once
        samples: dict[str, list[float]] = {}
        for _ in range(runs):
            row = {
                "bare python": first_line_ms([sys.executable, "-c", "print()"]),
                "msgspec": first_line_ms([sys.executable, "-c", f"{FIRST_ANSWER_LIBRARIES}; print()"]),
                "libraries": first_line_ms([sys.executable, "-c", f"{LIBRARIES}; print()"]),
                "libraries + wasmtime": first_line_ms([sys.executable, "-c", f"{LIBRARIES}, wasmtime; print()"]),
            }
            for tree, root in trees.items():
                for label, env in (("", None), (" .pyc", compiled)):
                    row[f"{tree}initialize{label}"], row[f"{tree}vm.create after it{label}"] = first_answers_ms(
                        "initialize", env, root)
                    row[f"{tree}ping{label}"], _ = first_answers_ms("ping", env, root)
            for name, value in row.items():
                samples.setdefault(name, []).append(value)
        return samples


def cold_start_report(samples: dict[str, list[float]], baseline: Path | None = None) -> None:
    runs = len(next(iter(samples.values())))
    print(f"cold start, ms from spawn (interleaved rounds, {runs}): median / min / max")
    for root in filter(None, (ROOT, baseline)):
        if any(root.glob("*/__pycache__/*.pyc")):  # a process spawned without PYTHONDONTWRITEBYTECODE wrote them
            print(f"  (the columns without .pyc read {root}'s __pycache__ all the same: remove it to measure them)")
    for name, values in samples.items():
        goal = "  (target <= 100 ms)" if name.startswith(("initialize", "ping")) else ""
        print(f"  {name:<31} {statistics.median(values):5.0f} {min(values):5.0f} {max(values):5.0f}{goal}")
    # Under load every column stretches alike: a column over a floor of the same round holds still.
    print("  per round, over the floor measured in it (median): msgspec / the libraries the daemon serves on")
    for name, values in samples.items():
        if "initialize" in name or "ping" in name:
            ratios = [statistics.median([value / floor for value, floor in zip(values, samples[base], strict=True)])
                      for base in ("msgspec", "libraries")]
            print(f"  {name:<31} {ratios[0]:5.2f}x {ratios[1]:5.2f}x")


TIMELINE = ("sidecar_started", "host_identified", "first answer read", "services_loaded", "vm.create answered")


def timeline_ms(runs: int) -> dict[str, list[float]]:
    """Ms from spawn to each of `TIMELINE`'s moments, per run, with this tree's .pyc files."""
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pyc-") as prefix:
        env = {"PYTHONPYCACHEPREFIX": prefix, "SIDECAR_LOG_LEVEL": "debug"}
        first_answers_ms("initialize", {**env, "PYTHONDONTWRITEBYTECODE": ""})  # writes them once
        for _ in range(runs):
            spawned = time.time()
            peer = Peer(SIDECAR, env, stderr=subprocess.PIPE)
            peer.request("initialize", INITIALIZE)
            read = time.time()
            peer.request("vm.create", VM_CREATE, request_id=2)
            created = time.time()
            peer.close()
            logged = {}
            for line in peer.proc.stderr.read().splitlines():
                event = json.loads(line)
                logged.setdefault(event["event"], datetime.fromisoformat(event["timestamp"]).timestamp())
            peer.proc.stderr.close()
            moments = [logged["sidecar_started"], logged["host_identified"], read, logged["services_loaded"], created]
            for name, moment in zip(TIMELINE, moments, strict=True):
                samples.setdefault(name, []).append((moment - spawned) * 1000)
    return samples


def timeline_report(samples: dict[str, list[float]]) -> None:
    runs = len(next(iter(samples.values())))
    print(f"cold start timeline, ms from spawn (.pyc, {runs} runs): median / min / max")
    for name, values in samples.items():
        print(f"  {name:<26} {statistics.median(values):5.0f} {min(values):5.0f} {max(values):5.0f}")


def report(cold: dict[str, list[float]] | None = None, calls: int = 2000, runs: int = 10) -> None:
    costs = dispatch_costs(calls)
    print("the sidecar's own CPU per request, in process, no round trip (µs, best median of 5 runs)")
    print(f"  ping {costs['ping']:.1f}   vm.call add {costs['add']:.1f} (+{costs['add'] - costs['ping']:.1f} over ping)"
          f"   vm.create from a module_id {costs['create']:.0f}")
    cpu = cpu_per_request(calls)
    print("CPU per round trip of the serving process, real processes, no spinning (µs; context switches per request)")
    print("  " + "   ".join(f"{name} {us:.1f} ({switches:.2f})" for name, (us, switches) in cpu.items()))
    for name, (answer, total) in create_breakdown(max(200, calls // 10)).items():
        print(f"  vm.create through the registry, {name:<9}: answer decided after {answer:5.1f} µs, "
              f"{total:5.1f} µs in all (median)")
    reused, fresh = instantiation_floor(max(200, calls // 10))
    print(f"wasmtime-py, abi.wat: store + instance from a linker defined once {reused:.1f} µs; "
          f"with a new linker and 7 host functions per instance {fresh:.1f} µs")
    cold_start_report(cold if cold is not None else cold_start_samples(runs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=10, help="cold start rounds")
    parser.add_argument("--baseline", type=Path, help="another checkout to sample in the same rounds")
    parser.add_argument("--timeline", type=int, default=5, help="runs of the cold start's timeline")
    parser.add_argument("--cold-only", action="store_true", help="only the cold start and its timeline")
    args = parser.parse_args()
    cold = cold_start_samples(args.cold, args.baseline)
    if args.cold_only:
        cold_start_report(cold, args.baseline)
    else:
        report(cold)
    timeline_report(timeline_ms(args.timeline))
