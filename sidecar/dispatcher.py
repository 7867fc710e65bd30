"""Dispatch of incoming frames: routing, the in-flight bound, cancellation, batches, responses.

Owns what happens to each decoded item, on the intake's leader thread (the threading rules are
`sidecar.intake`'s). Cheap methods run inline; slow methods become cancellable tasks on the event
loop; guest work is deferred to the VM, which answers from the thread that ran it. All three
answer through a `Reply`, a one-shot that any thread may complete, so a cancel racing a
completion yields exactly one response; every answer goes to the intake's `answer`, which
decides when it is written. Knows nothing about VMs or what methods do.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from protocol.decoding import (
    Frame,
    IncomingCall,
    IncomingResponse,
    Item,
    Malformed,
    decode_frame,
    decode_params,
    recover_id,
)
from protocol.envelope import ErrorObject, RequestId, Response, encode
from protocol.errors import (
    InternalError,
    InvalidRequestError,
    MethodNotFoundError,
    OverloadedError,
    RequestCancelledError,
    RpcError,
    env_var_for,
)
from protocol.framing import OversizedLine
from protocol.methods import METHODS, MethodSpec, decoder_for
from protocol.methods_session import Empty

from .limits import Limits
from .logs import log

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

_encoder = msgspec.json.Encoder()
RouteKind = Literal["inline", "task", "deferred"]


class Reply:
    """The one answer a request gets. `on_cancel` is how a handler learns it should stop."""

    __slots__ = ("id", "key", "method", "_send", "_finished", "_lock", "done", "on_cancel")

    def __init__(
        self,
        request_id: RequestId | None,
        method: str,
        send: Callable[[bytes | None], None],
        finished: Callable[[Reply], None],
    ) -> None:
        self.id = request_id
        self.key: object = request_id if request_id is not None else object()
        self.method = method
        self._send = send
        self._finished = finished
        self._lock = threading.Lock()
        self.done = False  # read it, never set it: `_complete` and `result_of` do, under the lock
        self.on_cancel: Callable[[], None] | None = None

    def result_of(self, commit: Callable[[], Any]) -> bool:
        """Answer with what `commit()` returns, decided against a cancel in one step: `commit` runs
        under the lock a cancel takes, and only if the request has not ended. So what it does (a VM
        registered) exists exactly when the host is told of it. False, `commit` not run, if the
        request ended first (it was cancelled): the caller undoes its work."""
        with self._lock:
            if self.done:
                return False
            value = commit()
            self.done = True
        # `_complete`'s delivery, repeated rather than shared: a helper would add a frame to
        # every answer on the vm.call path, where frames are what a call costs.
        self._finished(self)
        self._send(None if self.id is None else _encode_response(self.id, value, None))
        return True

    def error(self, error: RpcError) -> None:
        self._complete(None, error)

    def cancel(self, *, answer: bool = True) -> None:
        """End the request with -32800 (`answer` false: with no response at all, as MCP wants)."""
        cancelled = RequestCancelledError(f"request {self.id!r} was cancelled", id=self.id)
        if self._complete(None, cancelled, silent=not answer):
            hook = self.on_cancel
            if hook is not None:
                hook()

    def _complete(self, value: Any, error: RpcError | None = None, *, silent: bool = False) -> bool:
        with self._lock:
            if self.done:
                return False
            self.done = True
        self._finished(self)  # before the answer leaves: a host that sees it sees the request done
        if self.id is None or silent:  # a notification, or a silent cancel: nobody hears about it
            self._send(None)
        else:
            self._send(_encode_response(self.id, value, error))
        return True

    # `result(value)`: `_complete` itself, not a method calling it (a frame fewer on every vm.call).
    result = _complete


# The answer most requests get (`ping`'s, an integer id with an empty result), without building
# a `Response`; byte for byte what `encode` writes for it.
_EMPTY_RESULT = b'{"jsonrpc":"2.0","id":%d,"result":{}}\n'


def _encode_response(request_id: RequestId | None, value: Any, error: RpcError | None) -> bytes:
    if error is None:
        if type(request_id) is int and (value is None or type(value) is Empty):
            return _EMPTY_RESULT % request_id
        return encode(Response(id=request_id, result={} if value is None else value))
    return encode(Response(id=request_id, error=ErrorObject(**error.to_wire())))


class _Batch:
    """Collects the answers of one batch and sends them as one array once all are in."""

    def __init__(self, expected: int, send: Callable[[bytes], None]) -> None:
        self._lock = threading.Lock()
        self._parts: list[bytes] = []
        self._outstanding = expected
        self._sendout = send

    def add(self, frame: bytes | None) -> None:
        with self._lock:
            if frame is not None:
                self._parts.append(frame.rstrip(b"\n"))
            self._outstanding -= 1
            if self._outstanding or not self._parts:
                return
            payload = b"[" + b",".join(self._parts) + b"]\n"
        self._sendout(payload)


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    handler: Callable[..., Any]
    spec: MethodSpec
    decoder: msgspec.json.Decoder


class Dispatcher:
    """Inline handlers: `fn(params) -> result`; task handlers: `async fn(params) -> result`;
    deferred handlers: `fn(params, reply) -> None`, answering later from any thread."""

    def __init__(
        self,
        limits: Limits,
        answer: Callable[[bytes], None],
        deliver_response: Callable[..., bool],
        methods: Mapping[str, MethodSpec] = METHODS,
    ) -> None:
        """`methods`: the method table routes are declared in (the MCP front has its own). Inline
        methods are served from construction on; task methods once `attach_loop` is called."""
        self._limits = limits
        self._methods = methods
        self._deliver = answer  # `Intake.answer`: from any thread; the intake batches the leader's
        self._portal: BlockingPortal | None = None
        self._loop_thread: int | None = None
        # `HostCalls.deliver(response, unless_guest=...)`: an async call's answer runs the guest's callback
        self._deliver_response = deliver_response
        self._routes: dict[str, Route] = {}
        # Touched by the leader only (admission), and by whichever thread completes a reply
        # (removal): a single dict operation each, atomic under the GIL.
        self._in_flight: dict[object, Reply] = {}
        # Counted without a lock on the request path: `next` on an `itertools.count` is one C call
        # that never releases the GIL, so concurrent increments are never lost. Reading it takes
        # one increment too, subtracted again by counting the reads (under a lock: reads are rare).
        self._served = itertools.count()
        self._served_reads = itertools.count()
        self._served_read_lock = threading.Lock()
        # While services are still loading: blocks until their routes are in (raises an RpcError
        # if they failed). A method of the table with no route waits on it before it is unknown.
        self.await_routes: Callable[[], None] | None = None

    def attach_loop(self, portal: BlockingPortal) -> None:
        """On the event loop, once it runs: task methods start there, through `portal`."""
        self._portal = portal
        self._loop_thread = threading.get_ident()

    @property
    def requests_served(self) -> int:
        with self._served_read_lock:
            return next(self._served) - next(self._served_reads)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def methods(self) -> list[str]:
        return list(self._routes)

    def route(self, method: str, kind: RouteKind, handler: Callable[..., Any]) -> None:
        spec = self._methods[method]
        self._routes[method] = Route(kind, handler, spec, decoder_for(spec.params))

    def handle_if_cheap(self, line: bytes | OversizedLine) -> bool:
        """Handle `line` now if that is quick and never runs a guest (an answer to a blocking
        host call, an error, inline methods); otherwise leave it unhandled and return False.
        How a thread that must not be held up (a guest waiting on the host) reads on."""
        if isinstance(line, OversizedLine):
            self.handle_line(line)
            return True
        try:
            return self._handle_if_cheap(line)
        except Exception as exc:
            self._frame_failed(line, exc)
            return True

    def _handle_if_cheap(self, line: bytes) -> bool:
        frame = decode_frame(line)
        items = frame.items
        if not frame.batch and isinstance(items[0], IncomingResponse):
            return self._deliver_response(items[0], unless_guest=True)  # the common case: decided and done at once
        for item in items:
            if isinstance(item, IncomingResponse):  # within a batch: rare, left to another thread
                return False
            if isinstance(item, IncomingCall):
                route = self._routes.get(item.method)
                if route is not None and route.kind != "inline" or route is None and self.await_routes is not None:
                    return False
        self._handle_frame(frame)
        return True

    def handle_line(self, line: bytes | OversizedLine) -> None:
        """Handle one frame. Nothing raised while handling it escapes: it would stop the intake and
        with it the whole sidecar, so the frame is answered -32603 instead and serving goes on."""
        try:
            if isinstance(line, OversizedLine):
                self._refuse_oversized(line)
            else:
                self._handle_frame(decode_frame(line))
        except Exception as exc:
            self._frame_failed(line, exc)

    def _frame_failed(self, line: bytes | OversizedLine, exc: Exception) -> None:
        log.error("frame_failed", exc_info=exc)
        request_id = recover_id(line) if isinstance(line, bytes) else None
        self._deliver(_encode_response(request_id, None, InternalError("internal error while handling the frame")))

    def _refuse_oversized(self, line: OversizedLine) -> None:
        self._limits.exhausted("protocol_frame_bytes", line.seen, capacity=line.bound)
        refused = InvalidRequestError(f"frame larger than protocol_frame_bytes ({line.bound} bytes)",
                                      limit="protocol_frame_bytes", env=env_var_for("protocol_frame_bytes"),
                                      capacity=line.bound, observed=line.seen)
        self._deliver(_encode_response(None, None, refused))

    def _handle_frame(self, frame: Frame) -> None:
        items = frame.items
        if frame.batch:
            self._handle_batch(items)
        elif type(items[0]) is IncomingCall:  # the common frame, a frame sooner than `_handle_item`
            self._handle_call(items[0], None)
        else:
            self._handle_item(items[0], None)

    def _handle_batch(self, items: list[Item]) -> None:
        calls = sum(1 for item in items if not isinstance(item, IncomingResponse))
        batch = _Batch(calls, self._deliver)
        for item in items:
            self._handle_item(item, batch)

    def cancel(self, request_id: RequestId, *, answer: bool = True) -> bool:
        reply = self._in_flight.get(request_id)
        if reply is None:
            return False
        reply.cancel(answer=answer)
        return True

    def cancel_all(self) -> None:
        for reply in list(self._in_flight.values()):
            reply.cancel()

    def _handle_item(self, item: Any, batch: _Batch | None) -> None:
        if isinstance(item, IncomingResponse):
            self._deliver_response(item)
        elif isinstance(item, Malformed):
            self._answer_now(_encode_response(item.id, None, item.error), batch)
        else:
            self._handle_call(item, batch)

    def _answer_now(self, frame: bytes | None, batch: _Batch | None) -> None:
        if batch is not None:
            batch.add(frame)
        elif frame is not None:
            self._deliver(frame)

    def _deliver_unless_none(self, frame: bytes | None) -> None:
        if frame is not None:  # None: a notification's answer, which nobody hears
            self._deliver(frame)

    def _handle_call(self, call: IncomingCall, batch: _Batch | None) -> None:
        route = self._routes.get(call.method)
        waiting = self.await_routes
        if route is None and waiting is not None and call.method in self._methods:
            try:
                waiting()
            except RpcError as exc:
                self._answer_now(None if call.notification else _encode_response(call.id, None, exc), batch)
                return
            route = self._routes.get(call.method)
        if route is None:
            if call.notification:
                log.debug("notification_ignored", method=call.method)
                self._answer_now(None, batch)
            else:
                unknown = MethodNotFoundError(f"unknown method {call.method!r}", method=call.method)
                self._answer_now(_encode_response(call.id, None, unknown), batch)
            return
        try:
            params = decode_params(route.decoder, call.params)
            route.spec.check(params)
            if route.kind == "inline":
                result = route.handler(params)
                next(self._served)
                self._answer_now(None if call.notification else _encode_response(call.id, result, None), batch)
                return
            reply = self._admit(call, batch)
        except RpcError as exc:
            self._answer_now(None if call.notification else _encode_response(call.id, None, exc), batch)
            return
        except Exception as exc:  # a handler bug must cost one answer, never the daemon
            log.error("handler_failed", method=call.method, exc_info=exc)
            failed = InternalError(f"internal error in {call.method}")
            self._answer_now(None if call.notification else _encode_response(call.id, None, failed), batch)
            return
        if route.kind == "task":
            assert self._portal is not None, "task methods are routed once the loop runs"
            self._portal.start_task_soon(self._run_task, route.handler, params, reply)
        else:
            self._run_deferred(route.handler, params, reply)

    def _admit(self, call: IncomingCall, batch: _Batch | None) -> Reply:
        capacity = self._limits.protocol_requests_in_flight
        observed = len(self._in_flight) + 1
        if observed > capacity:
            self._limits.exhausted("protocol_requests_in_flight", observed, capacity=capacity)
            raise OverloadedError("protocol_requests_in_flight", capacity=capacity, observed=observed)
        if call.id is not None and call.id in self._in_flight:
            raise InvalidRequestError(f"request id {call.id!r} is already in flight", id=call.id)
        later = batch.add if batch is not None else self._deliver_unless_none
        reply = Reply(call.id, call.method, later, self._finish)
        # Notifications count against the bound too, under a key no host id can equal.
        self._in_flight[reply.key] = reply
        return reply

    def _on_loop(self, action: Callable[[], None]) -> None:
        if threading.get_ident() == self._loop_thread:
            action()
        else:
            assert self._portal is not None  # a task exists, so the loop does
            self._portal.call(action)

    def _finish(self, reply: Reply) -> None:
        next(self._served)
        # May run on a worker thread: single dict operations are atomic under the GIL.
        if self._in_flight.get(reply.key) is reply:
            del self._in_flight[reply.key]

    async def _run_task(self, handler: Callable[[Any], Awaitable[Any]], params: Any, reply: Reply) -> None:
        import anyio  # on the loop only: inline methods are served before anyio is imported

        with anyio.CancelScope() as scope:
            reply.on_cancel = lambda: self._on_loop(scope.cancel)
            try:
                reply.result(await handler(params))
            except RpcError as exc:
                reply.error(exc)
            except Exception as exc:
                log.error("handler_failed", method=reply.method, exc_info=exc)
                reply.error(InternalError(f"internal error in {reply.method}"))

    def _run_deferred(self, handler: Callable[[Any, Reply], None], params: Any, reply: Reply) -> None:
        try:
            handler(params, reply)
        except RpcError as exc:
            reply.error(exc)
        except Exception as exc:
            log.error("handler_failed", method=reply.method, exc_info=exc)
            reply.error(InternalError(f"internal error in {reply.method}"))
