"""What the hardening campaigns share: a sidecar process whose every byte and log line is kept.

The campaigns (`test_campaign_*.py`) drive the real `python -m sidecar` and judge it by what a
host can see: stdout, stderr and the exit status. `RawSidecar` writes raw bytes and reads raw
lines (for input the client library would refuse to send); `logged_session` is the ordinary
client with the process's stderr kept in a file. Every campaign ends with `assert_clean_logs`
(`logged_session` calls it on a clean exit): an `error`-level event or a traceback in the logs is
a defect even when every answer was right. `well_formed` is what every answer must look like;
`capped` runs the sidecar under a data-size limit for tests that may make it read without bound.

Seeded campaigns name their seed (`SIDECAR_FUZZ_SEED` replays one) in every failure through
`seed_noted`, so a failure in CI can be replayed on a laptop.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import random
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from protocol.client import HostHandler, SidecarClient

from .support import WAIT

SIDECAR = [sys.executable, "-m", "sidecar"]
ERROR_LEVELS = {"error", "critical", "exception"}
_CAPPED = (
    "import resource, runpy, sys; cap = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_DATA, (cap, cap)); sys.argv[0] = 'sidecar'; "
    "runpy.run_module('sidecar', run_name='__main__', alter_sys=True)"
)


def capped(data_bytes: int) -> list[str]:
    """`python -m sidecar` under an RLIMIT_DATA: a test that may make the sidecar read without
    bound (from /dev/zero, say) fails with a MemoryError there instead of eating the machine.
    Wasm linear memory reservations are not writable data, so guests still get theirs."""
    return [sys.executable, "-c", _CAPPED, str(data_bytes)]


def fuzz_seed() -> int:
    """`SIDECAR_FUZZ_SEED` when set (to replay a failure), else a fresh random seed."""
    configured = os.environ.get("SIDECAR_FUZZ_SEED", "").strip()
    return int(configured) if configured else random.SystemRandom().randrange(2**32)


@contextmanager
def seed_noted(seed: int) -> Iterator[None]:
    """Any failure inside, a timeout included, carries the seed that replays it."""
    print(f"SIDECAR_FUZZ_SEED={seed}")  # also in the captured output of a failing test
    try:
        yield
    except BaseException as exc:
        exc.add_note(f"replay with SIDECAR_FUZZ_SEED={seed}")
        raise


# -- logs ---------------------------------------------------------------------------------------


def log_events(text: bytes) -> list[dict[str, Any]]:
    """The JSON log lines of a sidecar's stderr; a line that is not JSON is kept as `raw`."""
    events = []
    for line in text.splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": "raw", "level": "raw", "raw": line.decode("utf-8", "replace")})
    return events


def assert_clean_logs(text: bytes) -> list[dict[str, Any]]:
    """No error-level event (`handler_failed`, `intake_failed`, `vm_job_failed`, ...), no
    traceback, no line that is not a log event (a panic, a stray print): returns the events."""
    events = log_events(text)
    bad = [e for e in events if e.get("level") in ERROR_LEVELS or e["event"] == "raw" or "Traceback" in str(e)]
    assert not bad, f"{len(bad)} bad log lines, first: {json.dumps(bad[:3])[:3000]}"
    return events


# -- a raw process ------------------------------------------------------------------------------


class RawSidecar:
    """A sidecar process spoken to in bytes: `send` writes, `line` reads one stdout line.

    Its stdin is a pipe this side holds by fd (`stdin_fd`), so a test can ask the kernel how
    much of what it wrote the sidecar has not read yet (`unread`). stderr goes to a file (a pipe
    nobody reads would fill and stall the logger); `logs()` reads it.
    """

    def __init__(self, process: anyio.abc.Process, stdin_fd: int, log_path: Path) -> None:
        self.process = process
        self.stdin_fd = stdin_fd
        self.log_path = log_path
        self._buffer = bytearray()
        self.eof = False

    @property
    def pid(self) -> int:
        return self.process.pid

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await anyio.wait_writable(self.stdin_fd)
            try:
                view = view[os.write(self.stdin_fd, view) :]
            except BlockingIOError:
                pass

    def unread(self) -> int:
        """Bytes written to stdin that the sidecar has not read yet (FIONREAD on the pipe)."""
        count = array.array("i", [0])
        fcntl.ioctl(self.stdin_fd, termios.FIONREAD, count)
        return count[0]

    async def request(self, request_id: Any, method: str, params: Any = None) -> dict[str, Any]:
        """One request, and its answer (the next line: use only when nothing else is in flight)."""
        message = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(json.dumps(message).encode() + b"\n")
        with anyio.fail_after(WAIT):
            answer = json.loads(await self.line())
        assert answer.get("id") == request_id, answer
        return answer

    async def line(self) -> bytes:
        """The next stdout line without its newline; b"" once stdout has ended."""
        assert self.process.stdout is not None
        while (newline := self._buffer.find(b"\n")) < 0:
            if self.eof:
                rest, self._buffer = bytes(self._buffer), bytearray()
                assert not rest, f"stdout ended inside a line: {rest[:200]!r}"
                return b""
            try:
                self._buffer += await self.process.stdout.receive(1 << 20)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.eof = True
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        return line

    def close_input(self) -> None:
        if self.stdin_fd >= 0:
            os.close(self.stdin_fd)
            self.stdin_fd = -1

    async def rest_of_output(self) -> list[bytes]:
        """Every line until stdout ends."""
        lines = []
        while line := await self.line():
            lines.append(line)
        return lines

    async def exit_code(self, within: float = WAIT) -> int:
        with anyio.fail_after(within):
            return await self.process.wait()

    def logs(self) -> bytes:
        return self.log_path.read_bytes()


@asynccontextmanager
async def raw_sidecar(
    log_dir: Path, env: Mapping[str, str] | None = None, command: list[str] | None = None
) -> AsyncIterator[RawSidecar]:
    """Spawn `python -m sidecar`; on the way out close its input and make sure it is gone."""
    log_path = log_dir / f"sidecar-{time.monotonic_ns()}.log"
    stdin_r, stdin_w = os.pipe()
    try:
        with log_path.open("wb") as log_file:
            process = await anyio.open_process(
                command or SIDECAR, stdin=stdin_r, stdout=subprocess.PIPE, stderr=log_file,
                env={**os.environ, **(env or {})},
            )
    finally:
        os.close(stdin_r)
    os.set_blocking(stdin_w, False)
    sidecar = RawSidecar(process, stdin_w, log_path)
    try:
        yield sidecar
    finally:
        with anyio.CancelScope(shield=True):
            sidecar.close_input()
            if process.returncode is None:
                with anyio.move_on_after(WAIT):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


@asynccontextmanager
async def logged_session(
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    host_handler: HostHandler | None = None,
    command: list[str] | None = None,
) -> AsyncIterator[SidecarClient]:
    """`SidecarClient.spawn` with stderr kept; when the block ends without an error the process
    must exit 0 at end of input and its logs must be clean."""
    log_path = log_dir / f"sidecar-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log_file:
        async with SidecarClient.spawn(
            command or SIDECAR, env=env, host_handler=host_handler, stderr=log_file.fileno()
        ) as client:
            yield client
    assert client.process is not None and client.process.returncode == 0, client.process
    assert_clean_logs(log_path.read_bytes())


def well_formed(frame: Any) -> bool:
    """One JSON-RPC 2.0 response (or a non-empty batch of them) as the sidecar must write it:
    exactly one of result and error, an error with an integer code, a message, a `data.kind`,
    and no traceback."""
    if isinstance(frame, list):
        return bool(frame) and all(well_formed(item) for item in frame)
    if not isinstance(frame, dict) or frame.get("jsonrpc") != "2.0" or "id" not in frame:
        return False
    if type(frame["id"]) not in (str, int, type(None)) or ("result" in frame) == ("error" in frame):
        return False
    if set(frame) - {"jsonrpc", "id", "result", "error"}:
        return False
    error = frame.get("error")
    if error is None:
        return True
    return (
        isinstance(error, dict)
        and type(error.get("code")) is int
        and isinstance(error.get("message"), str)
        and isinstance(error.get("data"), dict)
        and isinstance(error["data"].get("kind"), str)
        and "Traceback" not in json.dumps(error)
    )
