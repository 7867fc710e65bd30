"""Reading the host's input on a pool of threads, one of which reads at a time (leader/followers).

Owns fd 0's read side and the order in which frames are handled. The thread that reads a chunk
(the leader) also handles its frames, guest calls included, and writes the answers itself: a
`vm.call` costs no thread hand-off, which on these machines is worth more than the whole call.
Before that thread could make the host wait (a guest that runs past one epoch tick, a guest
blocked on `host_call`, a compile), it hands the reader role and the rest of its chunk to an
idle thread (`yield_leadership`), so nothing queues behind a slow request for more than a tick.
Knows nothing about what frames mean: the dispatcher does.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import structlog

from protocol.framing import LineFramer, OversizedLine

from .transport import READ_CHUNK

log = structlog.get_logger()
Line = bytes | OversizedLine


class FrameHandler(Protocol):
    """What the intake hands frames to (the dispatcher)."""

    def handle_line(self, line: Line) -> None: ...

    def handle_if_cheap(self, line: Line) -> bool: ...

    def flush(self) -> None: ...


class Intake:
    def __init__(
        self,
        fd: int,
        framer: LineFramer,
        threads: int,
        on_end: Callable[[str], None],
        spin_s: float = 0.0,
    ) -> None:
        self._fd = fd
        self._framer = framer
        self._handle_line: Callable[[Line], None]
        self._handle_if_cheap: Callable[[Line], bool]
        self._flush: Callable[[], None]
        self._thread_count = max(2, threads)  # one reads while another may run a guest
        self._on_end = on_end
        self._spin_s = spin_s
        self._lead = threading.Lock()
        self._leader: int | None = None
        self._backlog: deque[Line] = deque()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self._poller = select.poll()  # used by the leader only
        self._poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        self._poller.register(self._wake_r, select.POLLIN)
        self._threads: list[threading.Thread] = []
        self.closing = False  # set by `shutdown`: the rest of the input is not served

    def start(self, frames: FrameHandler, stack_bytes: int) -> None:
        """Start handing frames to `frames`, on threads with `stack_bytes` of native stack each:
        guests run on them, and a guest's wasm stack lives on the native one, so it must hold
        `vm_stack_bytes` and more. (The handler comes this late because it needs the intake.)"""
        self._handle_line, self._handle_if_cheap, self._flush = frames.handle_line, frames.handle_if_cheap, frames.flush
        previous = threading.stack_size(stack_bytes)
        try:
            self._start_threads()
        finally:
            threading.stack_size(previous)

    def _start_threads(self) -> None:
        for index in range(self._thread_count):
            thread = threading.Thread(target=self._serve, name=f"sidecar-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def is_leader(self) -> bool:
        return self._leader == threading.get_ident()

    def has_backlog(self) -> bool:
        """Frames already read are still waiting to be handled."""
        return bool(self._backlog)

    def flush(self) -> None:
        """Write the reading thread's gathered answers now (a no-op on other threads)."""
        if self._leader == threading.get_ident():
            self._flush()

    def yield_leadership(self) -> None:
        """Called by a thread that may keep the host waiting: if it reads, another thread takes over.

        Answers gathered so far leave first, and unhandled frames of its chunk go to the next leader.
        """
        if self._leader != threading.get_ident():
            return
        self._flush()
        self._leader = None
        self._lead.release()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def join(self, timeout_s: float) -> None:
        for thread in self._threads:
            thread.join(timeout_s)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _serve(self) -> None:
        me = threading.get_ident()
        while True:
            self._lead.acquire()
            if self._stopping:
                self._lead.release()
                return
            self._leader = me
            try:
                self._lead_while_possible(me)
            except Exception as exc:  # a bug here must not silently stop all reading
                log.error("intake_failed", exc_info=exc)
                self._finish("internal_error")
            if self._leader == me:
                self._leader = None
                self._lead.release()

    def _lead_while_possible(self, me: int) -> None:
        while self._leader == me and not self._stopping:
            if not self._backlog and not self._fill():
                return
            while self._backlog and self._leader == me:
                if self.closing:
                    self._backlog.clear()
                    break
                self._handle_line(self._backlog.popleft())
            if self._leader == me:
                self._flush()
            if self.closing:
                self._finish("shutdown_requested")
                return

    def _fill(self, timeout_s: float | None = None) -> bool:
        """Read the next chunk's frames into the backlog; False when stopped, out of time or at
        the end of input."""
        chunk = self._read(timeout_s)
        if chunk is None:
            return False
        if not chunk:
            self._finish("end_of_input")
            return False
        self._backlog.extend(self._framer.feed(chunk))
        return True

    def _read(self, timeout_s: float | None = None) -> bytes | None:
        """The next chunk, b"" at end of input, None when stopped (or `timeout_s` ran out).

        Before sleeping in `poll`, the reader keeps checking for input for `spin_s`: a host that
        answered our last frame usually sends its next one within microseconds, and waking a
        sleeping thread costs more here (~20 µs) than a whole `ping` does.
        """
        now = time.perf_counter()
        give_up = now + self._spin_s
        wait_ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
        while not self._stopping:
            events = dict(self._poller.poll(0))
            if not events:
                if time.perf_counter() < give_up:
                    continue
                events = dict(self._poller.poll(wait_ms))
                if not events:
                    return None
            if self._wake_r in events:
                return None
            if self._fd in events:
                try:
                    return os.read(self._fd, READ_CHUNK)
                except BlockingIOError:
                    continue
                except OSError:
                    return b""
        return None

    def wait_serving(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Called by a thread about to wait up to `timeout_s` for `ready`, an answer that arrives
        as input (a guest blocked in `host_call`). If that thread reads the input, it goes on
        reading and handling cheap frames itself, so the answer reaches it without waking any
        other thread; the first frame that needs real work makes it hand reading over instead.
        Returns when `ready()` is true, the time is up, or it no longer reads.
        """
        me = threading.get_ident()
        deadline = time.monotonic() + timeout_s
        while self._leader == me and not ready() and not self._stopping and not self.closing:
            if self._backlog:
                line = self._backlog.popleft()
                if not self._handle_if_cheap(line):
                    self._backlog.appendleft(line)  # the next reader handles it
                    self.yield_leadership()
                    return
                continue
            self._flush()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._fill(remaining):
                return
        if self._leader == me:
            self._flush()

    def _finish(self, reason: str) -> None:
        self._stopping = True
        self._on_end(reason)
