"""Reading the host's input on a pool of threads, one of which reads at a time (leader/followers).

Everything about who reads the host's input, who writes the answers gathered while reading, and
what may run on a thread while it reads lives here; other modules refer to these rules and keep
them, they do not restate them.

Rules
-----
1. One leader. Exactly one thread at a time reads fd 0: the one holding `_lead`. Only the leader
   touches the backlog (frames read but not yet handled) and the gathered answers.
2. The leader handles what it read, in order, on its own thread: a `vm.call` runs its guest right
   there, with no hand-off (a thread hand-off costs more here than a whole call).
3. Answers the leader produces are gathered and written once per chunk (`answer`), and the answer
   to a chunk's last frame leaves at once. Answers produced on any other thread (a task's, a guest's
   that gave up reading) go straight to the outbox, which is thread-safe.
4. Before the leader may keep the host waiting (a guest running past one epoch tick, a compile, a
   WASI run, a big snapshot), it hands leadership over (`yield_reading`): its gathered answers leave
   first, and the unhandled frames of its chunk stay in the backlog for the next leader.
5. A leader whose guest waits in a blocking `host_call` keeps reading (`wait_serving`), so the
   answer reaches it without waking another thread. While it does, a guest is on its stack, so it
   handles only frames that run no guest code (an answer to a blocking host call, errors, inline
   methods: `FrameHandler.handle_if_cheap`); the first frame that needs more makes it hand over.
   Nothing re-enters a guest on a thread that already has one on its stack.

Theory of operation: the pool has `runner_worker_threads` threads (at least two: one may run a
guest while another reads). Two start with the intake and the rest on a helper thread, so the
first answer does not wait for a dozen thread starts (~1 ms each on a loaded 2-core machine).
Idle threads block on `_lead`; the leader polls fd 0 (spinning briefly
first: a host that just got an answer usually writes its next frame within microseconds), feeds
the framer, and handles the backlog. Guest work learns of these rules only through the
`runtime.InputReader` protocol this class implements. Knows nothing about what frames mean: the
dispatcher does.
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

from protocol.framing import LineFramer, OversizedLine

from .logs import log

READ_CHUNK = 1 << 16  # bytes asked of one read(2): a pipe's default capacity
_FIRST_THREADS = 2  # started before the intake serves: one reads while the other may run a guest
# `threading.stack_size` is process-wide: one intake at a time sets it, starts a thread, restores it.
_STACK_SIZE = threading.Lock()
Line = bytes | OversizedLine


class FrameHandler(Protocol):
    """What the intake hands frames to (the dispatcher). Neither method raises."""

    def handle_line(self, line: Line) -> None: ...

    def handle_if_cheap(self, line: Line) -> bool:
        """Handle `line` only if that runs no guest code (rule 5); False leaves it unhandled."""
        ...


class Intake:
    def __init__(
        self,
        fd: int,
        framer: LineFramer,
        threads: int,
        on_end: Callable[[str], None],
        send: Callable[[bytes], None],
        spin_s: float = 0.0,
    ) -> None:
        self._fd = fd
        self._framer = framer
        self._handle_line: Callable[[Line], None]
        self._handle_if_cheap: Callable[[Line], bool]
        self._send = send
        self._gathered: list[bytes] = []  # the leader's answers, written once per chunk (rule 3)
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
        self._starter: threading.Thread | None = None  # starts the rest of the pool
        self._stack_bytes = 0
        self.closing = False  # set by `shutdown`: the rest of the input is not served

    def start(self, frames: FrameHandler, stack_bytes: int) -> None:
        """Start handing frames to `frames`, on threads with `stack_bytes` of native stack each:
        guests run on them, and a guest's wasm stack lives on the native one, so it must hold
        `vm_stack_bytes` and more. (The handler comes this late because it needs the intake.)"""
        self._handle_line, self._handle_if_cheap = frames.handle_line, frames.handle_if_cheap
        self._stack_bytes = stack_bytes
        self._start_threads(_FIRST_THREADS)
        if self._thread_count > _FIRST_THREADS:
            self._starter = threading.Thread(target=self._start_threads, args=(self._thread_count - _FIRST_THREADS,),
                                             name="sidecar-pool-starter", daemon=True)
            self._starter.start()

    def _start_threads(self, count: int) -> None:
        for _ in range(count):
            if self._stopping:
                return
            with _STACK_SIZE:
                previous = threading.stack_size(self._stack_bytes)
                try:
                    thread = threading.Thread(target=self._serve, name=f"sidecar-worker-{len(self._threads)}",
                                              daemon=True)
                    thread.start()
                finally:
                    threading.stack_size(previous)
            self._threads.append(thread)

    def answer(self, frame: bytes) -> None:
        """Send one answer, from any thread (rule 3): the leader's wait for the end of its chunk
        unless this is the chunk's last frame; any other thread's leave at once."""
        if self._leader != threading.get_ident():
            self._send(frame)
            return
        self._gathered.append(frame)
        if not self._backlog:
            self._flush()

    def yield_reading(self) -> None:
        """Called by a thread that may keep the host waiting: if it leads, another thread takes
        over (rule 4). Answers gathered so far leave first; unhandled frames stay for the next leader.
        """
        if self._leader != threading.get_ident():
            return
        self._flush()
        self._leader = None
        self._lead.release()

    def send_gathered(self) -> None:
        """Called by a leader about to block while keeping the reader role (a request waiting for
        the services to load, `Server`): the answers gathered so far leave first (rule 3)."""
        if self._leader == threading.get_ident():
            self._flush()

    def _flush(self) -> None:
        if self._gathered:
            out = b"".join(self._gathered)
            self._gathered.clear()
            self._send(out)

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def join(self, timeout_s: float) -> None:
        if self._starter is not None:  # stopped: it starts no more threads
            self._starter.join(timeout_s)
        for thread in list(self._threads):
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
            if self._leader == me and self._gathered:  # checked here: a frame per chunk costs more
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
        as input (a guest blocked in `host_call`). If that thread leads, it goes on reading and
        handling cheap frames itself (rule 5). Returns when `ready()` is true, the time is up, or
        it no longer leads.
        """
        me = threading.get_ident()
        deadline = time.monotonic() + timeout_s
        while self._leader == me and not ready() and not self._stopping and not self.closing:
            if self._backlog:
                line = self._backlog.popleft()
                if not self._handle_if_cheap(line):
                    self._backlog.appendleft(line)  # the next reader handles it
                    self.yield_reading()
                    return
                continue
            if self._gathered:
                self._flush()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._fill(remaining):
                return
        if self._leader == me and self._gathered:
            self._flush()

    def _finish(self, reason: str) -> None:
        self._stopping = True
        self._on_end(reason)
