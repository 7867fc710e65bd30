"""Benchmark plumbing shared by the scripts here: a raw-pipe peer that reads through a buffer.

Reading line by line from an unbuffered pipe costs a system call per byte and would measure
this client instead of the process under test, so replies are read in large chunks.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIDECAR = [sys.executable, "-m", "sidecar"]
ECHO = [sys.executable, str(Path(__file__).with_name("echo_server.py"))]
FLOOR = [sys.executable, str(Path(__file__).with_name("floor_server.py"))]  # + "add" or "ask"


class Peer:
    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, *, root: Path = ROOT,
                 stderr: int = subprocess.DEVNULL) -> None:
        """`root`: the tree whose `sidecar` runs (the working directory); `stderr`: where its logs go."""
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, **(env or {})},
            cwd=root,
        )
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        self._buffer = bytearray()
        self._last_id = 1 << 30  # `result` ids: far from the small ids scripts pick for `request`

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._in, view) :]

    def read_lines(self, count: int) -> list[bytes]:
        """Exactly `count` complete lines, reading 1 MiB at a time."""
        lines: list[bytes] = []
        while len(lines) < count:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                chunk = os.read(self._out, 1 << 20)
                if not chunk:
                    raise RuntimeError("peer closed its output")
                self._buffer += chunk
                continue
            lines.append(bytes(self._buffer[:newline]))
            del self._buffer[: newline + 1]
        return lines

    def count_lines(self, count: int) -> None:
        """Consume `count` lines without splitting them (throughput runs)."""
        seen = 0
        while seen < count:
            chunk = os.read(self._out, 1 << 20)
            if not chunk:
                raise RuntimeError("peer closed its output")
            seen += chunk.count(b"\n")

    def request(self, method: str, params: object = None, request_id: int = 1) -> dict:
        message = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(json.dumps(message).encode() + b"\n")
        return json.loads(self.read_lines(1)[0])

    def result(self, method: str, params: object = None) -> Any:
        """A request under the next id; its result (an error answer raises)."""
        return self.timed_result(method, params)[1]

    def timed_result(self, method: str, params: object = None) -> tuple[float, Any]:
        """A request under the next id: its round trip in microseconds, and its result."""
        self._last_id += 1
        message = {"jsonrpc": "2.0", "id": self._last_id, "method": method}
        if params is not None:
            message["params"] = params
        frame = json.dumps(message).encode() + b"\n"
        started = time.perf_counter()
        self.send(frame)
        [line] = self.read_lines(1)
        elapsed = (time.perf_counter() - started) * 1e6
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return elapsed, answer["result"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


def pipelined(peer: Peer, total: int, window: int, frame: bytes) -> float:
    """Requests per second with `window` requests always in flight (the frame's id is fixed)."""
    started = time.perf_counter()
    peer.send(frame * window)
    sent, done = window, 0
    while done < total:
        chunk = os.read(peer._out, 1 << 20)
        answered = chunk.count(b"\n")
        done += answered
        more = min(answered, total - sent)
        if more > 0:
            peer.send(frame * more)
            sent += more
    return total / (time.perf_counter() - started)


def round_trips(peer: Peer, frame: bytes, count: int) -> list[float]:
    """Latency of `count` sequential round trips, in microseconds."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        peer.send(frame)
        peer.read_lines(1)
        times.append((time.perf_counter() - started) * 1e6)
    return times


def best_us(op: Callable[[], object], *, n: int, runs: int) -> float:
    """Best mean µs per call of `op` over `runs` runs of `n` calls (the least disturbed run)."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(n):
            op()
        best = min(best, (time.perf_counter() - started) / n)
    return best * 1e6


def rss_bytes(pid: int) -> int:
    """The resident set size of process `pid` (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def private_bytes(pid: int) -> int:
    """Memory only process `pid` holds (Private_Clean + Private_Dirty in /proc/PID/smaps_rollup).
    Unlike RSS, it does not count a shared page once per mapping: copy-on-write images of baked
    modules, mapped by every instance, are in RSS as many times as there are instances."""
    return _smaps_rollup_bytes(pid, "Private_Clean:", "Private_Dirty:")


def pss_bytes(pid: int) -> int:
    """Process `pid`'s proportional set size (Pss in /proc/PID/smaps_rollup): its private pages
    plus its share of each shared one. A page the process maps many times and nobody else maps (a
    module image read by many instances) counts once: near what a memory cgroup charges for it."""
    return _smaps_rollup_bytes(pid, "Pss:")


def _smaps_rollup_bytes(pid: int, *fields: str) -> int:
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(fields):
            total += int(line.split()[1]) * 1024
    return total


def cgroup_bytes(pid: int) -> int | None:
    """What the memory cgroup of process `pid` is charged (cgroup v2 `memory.current`, v1
    `memory.usage_in_bytes`); None where it cannot be read. Everything in that cgroup counts."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            candidates = [Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.current"]
        elif "memory" in controllers.split(","):
            candidates = [Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.usage_in_bytes"]
        else:
            continue
        for candidate in candidates:
            try:
                return int(candidate.read_text())
            except (OSError, ValueError):
                pass
    return None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process `pid` has used (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.1f}  p90 {percentile(values, 0.9):.1f}  p99 {percentile(values, 0.99):.1f}"
