"""A host-side client for Python hosts (and this project's tests): spawn or attach, then talk.

Owns the host's half of the protocol: request ids and response matching, serving the sidecar's
`host.call` requests with a handler the host registers, and handing notifications and frames
that match nothing (errors with id null, answers to raw frames) to the caller. Runs on anyio.
The only module of `protocol` that does I/O, and only through the streams it is given.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import msgspec

from .envelope import ErrorObject, Notification, Request, Response, encode
from .framing import LineFramer

HostHandler = Callable[[str, str, Any], Awaitable[Any]]
_decoder = msgspec.json.Decoder()
CLIENT_FRAME_BOUND = 1 << 30  # the host trusts its sidecar; this only stops runaway buffering


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


class _Waiter:
    __slots__ = ("event", "message")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.message: dict[str, Any] | None = None


class SidecarClient:
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
        self._ids = itertools.count(1)
        self._waiters: dict[int | str, _Waiter] = {}
        self._send_lock = anyio.Lock()
        self._notify_in, self.notifications = anyio.create_memory_object_stream[dict[str, Any]](math.inf)
        self._other_in, self.unsolicited = anyio.create_memory_object_stream[Any](math.inf)
        self.closed = anyio.Event()
        self.process: anyio.abc.Process | None = None  # set when `spawn` started the sidecar

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

    async def request(self, method: str, params: Any = None) -> Any:
        """Send a request and wait for its result; raise `RemoteError` for an error response."""
        _, result = await self.start_request(method, params)
        return await result()

    async def start_request(self, method: str, params: Any = None) -> tuple[int, Callable[[], Awaitable[Any]]]:
        """Send now, wait later: returns the id (for `$/cancelRequest`) and an awaitable result."""
        request_id = next(self._ids)
        waiter = _Waiter()
        self._waiters[request_id] = waiter
        await self.send_frame(encode(Request(id=request_id, method=method, params=_params(params))))

        async def result() -> Any:
            try:
                await waiter.event.wait()
            finally:
                self._waiters.pop(request_id, None)
            return _unwrap(waiter.message)

        return request_id, result

    async def notify(self, method: str, params: Any = None) -> None:
        await self.send_frame(encode(Notification(method=method, params=_params(params))))

    async def cancel(self, request_id: int) -> None:
        await self.notify("$/cancelRequest", {"id": request_id})

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
            for waiter in self._waiters.values():
                waiter.message = {"error": {"code": -32603, "message": "sidecar closed the connection"}}
                waiter.event.set()

    def _route(self, message: Any) -> None:
        if not isinstance(message, dict):  # a batch answer: this client sends batches only raw
            self._other_in.send_nowait(message)
        elif "method" in message and "id" in message:
            self._tg.start_soon(self._serve_host_call, message)
        elif "method" in message:
            self._notify_in.send_nowait(message)
        elif (waiter := self._waiters.get(message.get("id"))) is not None and not waiter.event.is_set():
            waiter.message = message
            waiter.event.set()
        else:
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


def _params(params: Any) -> Any:
    return msgspec.UNSET if params is None else params


def _unwrap(message: dict[str, Any] | None) -> Any:
    assert message is not None
    if "error" in message:
        error = message["error"]
        raise RemoteError(error.get("code", 0), error.get("message", ""), error.get("data"))
    return message.get("result")
