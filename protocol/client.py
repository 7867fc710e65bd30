"""A host-side client for Python hosts (and this project's tests): spawn or attach, then talk.

Owns the host's half of the conversation: sending requests and waiting for their answers,
serving the sidecar's `host.call` requests with a handler the host registers, and handing
notifications and frames that match nothing (errors with id null, answers to raw frames) to the
caller. Runs on anyio. The only module of `protocol` that does I/O, and only through the
streams it is given.

Ids, the pending table and the verdict on every response are `protocol.correlator`'s, the same
kernel the daemon uses for its `host.call`s; this module only waits. The waiting rules:
- One deadline per wait: `request(..., timeout_s=)` bounds sending and waiting together, a
  result's `timeout_s` bounds its wait; each is one `anyio.fail_after`.
- A request's pending entry leaves the table on every path: answered (the correlator pops it),
  timed out or cancelled (the wait abandons it), connection closed (every entry is abandoned),
  never awaited (dropping or closing its `PendingResult` abandons it). An answer that comes
  after its request was given up is counted `stale`, never delivered.
- All of it runs on the client's event loop; nothing here is shared with other threads.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import msgspec

from .client_calls import SidecarCalls
from .correlator import Correlator, Delivered, DropReason, Pending
from .envelope import ErrorObject, Notification, Request, RequestId, Response, encode
from .framing import LineFramer

HostHandler = Callable[[str, str, Any], Awaitable[Any]]
_decoder = msgspec.json.Decoder()
CLIENT_FRAME_BOUND = 1 << 30  # the host trusts its sidecar; this only stops runaway buffering
# Ids remembered after their answer or abandonment, to tell `duplicate` and `stale` answers from
# `unmatched` ones; past it the oldest are forgotten (and still count as `stale`).
CLIENT_COMPLETED_IDS = 1024
_OWNER = "host"  # the correlator groups calls by owner; every call of this client has the same
# How long a given-up request's `$/cancelRequest` may wait for the pipe: only a sidecar that stopped
# reading makes it wait at all, and then the request is given up without it.
CANCEL_SEND_WAIT_S = 5


class RemoteError(Exception):
    """The sidecar answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data

    @property
    def kind(self) -> str | None:
        return self.data.get("kind") if isinstance(self.data, dict) else None


class HostError(Exception):
    """Raise from a host handler to answer `host.call` with this error instead of a result."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.error = ErrorObject(code=code, message=message, data=msgspec.UNSET if data is None else data)


class ConnectionClosed(Exception):
    """The connection to the sidecar ended before this request was answered."""


@dataclass(frozen=True)
class ClientStatistics:
    requests_pending: int
    """Requests sent and neither answered nor given up."""
    responses_dropped: Mapping[DropReason, int]
    """Responses that matched no pending request, by reason (as `sidecar.stats` counts them)."""


class _Waiter:
    """What one request's wait shares with the read loop: `Pending.waiter` in the correlator."""

    __slots__ = ("event", "message", "closed")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.message: dict[str, Any] | None = None
        self.closed = False  # the connection ended without an answer


class PendingResult:
    """The answer to one request sent by `start_request`: call it to wait for the answer.

    Dropping it (CPython drops it at once, once the last reference goes) or `close()` gives the
    request up, so a result never awaited leaves nothing pending. A result whose wait timed out,
    was cancelled or ended with the connection cannot be awaited again.
    """

    __slots__ = ("id", "_waiter", "_give_up", "__weakref__")

    def __init__(self, client: SidecarClient, pending: Pending) -> None:
        self.id = pending.id
        self._waiter: _Waiter = pending.waiter
        # The finalizer holds the correlator, not this object, so it can run when this is dropped.
        self._give_up = weakref.finalize(self, client._correlator.abandon, pending.id)

    async def __call__(self, timeout_s: float | None = None) -> Any:
        """The result; `RemoteError` for an error answer, `TimeoutError` past `timeout_s`."""
        waiter = self._waiter
        if not waiter.event.is_set() and not self._give_up.alive:
            raise RuntimeError(f"request {self.id} was given up; its answer is no longer awaited")
        try:
            with anyio.fail_after(timeout_s):
                await waiter.event.wait()
        finally:
            self.close()  # after an answer the correlator has popped it already: a no-op
        if waiter.closed:
            raise ConnectionClosed(f"the sidecar closed the connection before answering {self.id}")
        return _unwrap(waiter.message)

    def close(self) -> None:
        """Stop waiting: an answer that still comes is dropped as `stale`."""
        self._give_up()


class SidecarClient(SidecarCalls):
    """The host's side of one connection; the typed operations (`call`, `eval`, ...) are `SidecarCalls`'."""

    def __init__(
        self,
        send_stream: anyio.abc.ByteSendStream,
        receive_stream: anyio.abc.ByteReceiveStream,
        task_group: anyio.abc.TaskGroup,
        host_handler: HostHandler | None = None,
    ) -> None:
        self._send_stream = send_stream
        self._receive_stream = receive_stream
        self._tg = task_group
        self._host_handler = host_handler
        self._correlator = Correlator(CLIENT_COMPLETED_IDS)
        self._dropped: dict[DropReason, int] = {"unmatched": 0, "duplicate": 0, "stale": 0}
        self._send_lock = anyio.Lock()
        self._notify_in, self.notifications = anyio.create_memory_object_stream[dict[str, Any]](math.inf)
        self._other_in, self.unsolicited = anyio.create_memory_object_stream[Any](math.inf)
        self.closed = anyio.Event()
        self.process: anyio.abc.Process | None = None  # set when `spawn` started the sidecar
        self._frame_bound: dict[str, Any] | None = None  # `protocol_frame_bytes`, once `initialize` told it

    @classmethod
    @asynccontextmanager
    async def attach(
        cls,
        send_stream: anyio.abc.ByteSendStream,
        receive_stream: anyio.abc.ByteReceiveStream,
        host_handler: HostHandler | None = None,
    ) -> AsyncIterator[SidecarClient]:
        async with anyio.create_task_group() as tg:
            client = cls(send_stream, receive_stream, tg, host_handler)
            tg.start_soon(client._read_loop)
            try:
                yield client
            finally:
                tg.cancel_scope.cancel()
                for stream in (client._notify_in, client.notifications, client._other_in, client.unsolicited):
                    stream.close()

    @classmethod
    @asynccontextmanager
    async def spawn(
        cls,
        command: Sequence[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        host_handler: HostHandler | None = None,
        stderr: int | None = None,
    ) -> AsyncIterator[SidecarClient]:
        """Start `wasm-sidecar` (by default this interpreter's `-m sidecar`) and drive it.

        On exit the sidecar's stdin is closed, which makes it dispose its VMs and exit.
        """
        argv = list(command) if command is not None else [sys.executable, "-m", "sidecar"]
        full_env = {**os.environ, **(env or {})}
        process = await anyio.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=full_env
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            async with cls.attach(process.stdin, process.stdout, host_handler) as client:
                client.process = process
                yield client
                await process.stdin.aclose()
                await client.closed.wait()
        finally:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    async def request(self, method: str, params: Any = None, *, timeout_s: float | None = None) -> Any:
        """Send a request and wait for its result; raise `RemoteError` for an error response.

        `timeout_s` bounds sending and waiting together (`TimeoutError`). A wait cut short, by
        `timeout_s` or by cancelling the calling scope, sends `$/cancelRequest`, so the sidecar
        stops the work too (a `start_request` result is given up without it: `cancel` is apart).
        """
        with anyio.fail_after(timeout_s):
            request_id, result = await self.start_request(method, params)
            try:
                answer = await result()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_SEND_WAIT_S):
                    await self._cancel_quietly(request_id)
                raise
        if method == "initialize" and isinstance(answer, dict):
            self._frame_bound = next((row for row in answer.get("limits", ())
                                      if row.get("name") == "protocol_frame_bytes"), None)
        return answer

    async def start_request(self, method: str, params: Any = None) -> tuple[str, PendingResult]:
        """Send now, wait later: returns the id (for `cancel`) and the result to await."""
        # The params stay out of the pending table: a module upload need not live until its answer.
        pending = self._correlator.issue(_OWNER, method, None, _Waiter())
        result = PendingResult(self, pending)
        try:
            frame = encode(Request(id=pending.id, method=method, params=_params(params)))
            self._refuse_oversized(frame)
            await self.send_frame(frame)
        except BaseException:
            result.close()
            raise
        if self.closed.is_set() and self._correlator.abandon(pending.id) is not None:
            _wake_closed(pending)  # the read loop ended, and woke what was pending, before this was sent
        return pending.id, result

    def _refuse_oversized(self, frame: bytes) -> None:
        """The sidecar's own refusal of a frame over `protocol_frame_bytes`, made here: it answers
        such a frame with id null (it cannot read the id), so the request would never settle."""
        bound, observed = self._frame_bound, len(frame.rstrip(b"\r\n"))
        if bound is not None and observed > bound["value"]:
            raise RemoteError(-32600, f"frame larger than protocol_frame_bytes ({bound['value']} bytes)", {
                "kind": "invalid_request", "limit": bound["name"], "env": bound.get("env"),
                "capacity": bound["value"], "observed": observed})

    async def notify(self, method: str, params: Any = None) -> None:
        await self.send_frame(encode(Notification(method=method, params=_params(params))))

    async def cancel(self, request_id: RequestId) -> None:
        """Ask the sidecar to end a request: its result then raises `RemoteError` -32800."""
        await self.notify("$/cancelRequest", {"id": request_id})

    async def _cancel_quietly(self, request_id: RequestId) -> None:
        try:
            await self.cancel(request_id)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the sidecar is gone, and the work with it

    def on_host_call(self, handler: HostHandler | None) -> None:
        """Answer the sidecar's `host.call`s with `handler(vm_id, method, params)` from now on.

        Its return value is the result; raising `HostError` answers with that error, any other
        exception with -32603 and its repr. Without a handler every call is answered -32601.
        """
        self._host_handler = handler

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(len(self._correlator), dict(self._dropped))

    async def send_frame(self, frame: bytes) -> None:
        """Send raw bytes as they are (tests use this for malformed input)."""
        async with self._send_lock:
            await self._send_stream.send(frame)

    async def _read_loop(self) -> None:
        framer = LineFramer(CLIENT_FRAME_BOUND)
        try:
            while True:
                try:
                    chunk = await self._receive_stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                for line in framer.feed(chunk):
                    self._route(_decoder.decode(line))
        finally:
            self.closed.set()
            for pending in self._correlator.abandon_owner(_OWNER):
                _wake_closed(pending)

    def _route(self, message: Any) -> None:
        if not isinstance(message, dict):  # a batch answer: this client sends batches only raw
            self._other_in.send_nowait(message)
        elif "method" in message and "id" in message:
            self._tg.start_soon(self._serve_host_call, message)
        elif "method" in message:
            self._notify_in.send_nowait(message)
        else:
            verdict = self._correlator.resolve(message.get("id"))
            if isinstance(verdict, Delivered):
                verdict.pending.waiter.message = message
                verdict.pending.waiter.event.set()
            else:
                self._dropped[verdict.reason] += 1
                self._other_in.send_nowait(message)

    async def _serve_host_call(self, message: dict[str, Any]) -> None:
        params = message.get("params") or {}
        try:
            if message["method"] != "host.call" or self._host_handler is None:
                raise HostError(-32601, f"host does not serve {message['method']!r}")
            result = await self._host_handler(params.get("vm_id"), params.get("method"), params.get("params"))
            response = Response(id=message["id"], result=result)
        except HostError as exc:
            response = Response(id=message["id"], error=exc.error)
        except Exception as exc:  # the host's handler failed: the guest hears an error, not silence
            response = Response(id=message["id"], error=ErrorObject(code=-32603, message=repr(exc)))
        try:
            await self.send_frame(encode(response))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the sidecar is gone; nobody is waiting for this answer


def _wake_closed(pending: Pending) -> None:
    pending.waiter.closed = True
    pending.waiter.event.set()


def _params(params: Any) -> Any:
    return msgspec.UNSET if params is None else params


def _unwrap(message: dict[str, Any] | None) -> Any:
    assert message is not None
    if "error" in message:
        error = message["error"]
        raise RemoteError(error.get("code", 0), error.get("message", ""), error.get("data"))
    return message.get("result")
