"""Byte transport between the host and the sidecar: the only code that touches fds 0 and 1.

Owns the stdio descriptors (claimed at start so nothing else can use them) and the bounded
outbox that any thread may send frames through; `sidecar.intake` reads the input side (fd 0,
claimed here).
A frame is written straight to the pipe by the thread that produced it when nothing is queued
(a guest's worker answers its own `vm.call` without a thread hand-off); what the pipe cannot
take at once waits in the outbox and a drainer task on the event loop writes it when the pipe
is writable. Past `protocol_outbox_bytes` queued, every thread but the event loop's blocks in
`send`, the one reading input among them, so a host that reads slowly slows the sidecar down
instead of growing its memory (the event loop only sends a bounded number of task answers).
Knows nothing about JSON-RPC.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .logs import log

if TYPE_CHECKING:
    import anyio


class FdSink:
    """The host's end of the protocol output: a non-blocking pipe, socket or file."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write_now(self, data: bytes) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0

    async def write_all(self, data: bytes) -> None:
        import anyio  # on the event loop only: the first answers leave before anyio is imported

        view = memoryview(data)
        while view:
            written = self.write_now(view)
            if written:
                view = view[written:]
            else:
                await anyio.wait_writable(self._fd)


class Outbox:
    """Bounded, thread-safe queue of outgoing frames with direct writes when it is empty.

    Constructed on the thread that runs the event loop (before the loop starts, when the first
    answers leave without it): that thread is never made to wait for room.
    """

    def __init__(self, sink: FdSink, capacity_bytes: int) -> None:
        self._sink = sink
        self._capacity = capacity_bytes
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._draining = False  # the drainer holds bytes taken from the queue
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._loop_thread = threading.get_ident()
        self._idle_event: anyio.Event | None = None  # made by `flush`, on the loop
        self.closed = False
        self.broken = False  # the peer went away: the server shuts down

    def send(self, data: bytes) -> None:
        """Send one or more frames. Never blocks the event loop; other threads wait for room."""
        with self._lock:
            if self.closed:
                return
            if not self._queue and not self._draining:
                try:
                    written = self._sink.write_now(data)
                except OSError as exc:
                    self._fail(exc)
                    return
                if written == len(data):
                    return
                data = data[written:]
            self._queue.append(data)
            self._queued_bytes += len(data)
            self._poke()
            if threading.get_ident() != self._loop_thread:
                while self._queued_bytes > self._capacity and not self.closed:
                    self._room.wait()

    async def run_drainer(self) -> None:
        """Write queued frames as the peer accepts them; returns once closed or broken."""
        import anyio

        try:
            while not self.closed:
                batch = self._take()
                if batch is None:
                    await anyio.wait_readable(self._wake_r)
                    self._clear_wake()
                    continue
                try:
                    await self._sink.write_all(batch)
                except OSError as exc:
                    with self._lock:
                        self._fail(exc)
                    return
                with self._lock:
                    self._draining = False
                    self._room.notify_all()
                self._idle()
        finally:
            self._idle()
            self._close_wake()

    async def flush(self) -> None:
        """Wait until everything sent so far has been handed to the sink (used at shutdown)."""
        import anyio

        while (self._queue or self._draining) and not self.closed:
            self._idle_event = anyio.Event()
            await self._idle_event.wait()

    def _idle(self) -> None:
        if self._idle_event is not None:
            self._idle_event.set()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._room.notify_all()
            self._poke()
        self._idle()

    def _take(self) -> bytes | None:
        with self._lock:
            if not self._queue:
                return None
            batch = b"".join(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            self._draining = True
            return batch

    def _fail(self, exc: BaseException) -> None:
        if not self.closed:
            log.warning("output_closed", error=type(exc).__name__, detail=str(exc))
        self.closed = True
        self.broken = True
        self._queue.clear()
        self._queued_bytes = 0
        self._room.notify_all()
        self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _clear_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass

    def _close_wake(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def nonblocking(*fds: int) -> Iterator[None]:
    """Make the stdio fds non-blocking for the daemon's life and restore them after.

    The flag lives on the open file description, which a terminal shares with the shell that
    started us, so leaving it set would break that shell.
    """
    saved = {}
    for fd in fds:
        try:
            saved[fd] = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, saved[fd] | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
    try:
        yield
    finally:
        for fd, flags in saved.items():
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def claim_stdio() -> tuple[int, int]:
    """Take fds 0 and 1 for the protocol and point them elsewhere (/dev/null, stderr).

    Returns private duplicates for the transport. Anything else that writes to fd 1 (a stray
    print, native code, a guest given the real stdout by mistake) then lands in the log stream
    instead of corrupting the protocol, and nothing else can read the host's requests.
    """
    protocol_in, protocol_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return protocol_in, protocol_out
