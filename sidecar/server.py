"""The daemon's life: wire transport, dispatcher and services together, serve, shut down cleanly.

Owns the read loop (input chunks → frames → dispatcher, inline answers written once per chunk),
the session methods (`initialize`, `ping`, `shutdown`, `sidecar.stats`, `sidecar.limits`,
`$/cancelRequest`) and the ways a session ends: `shutdown`, end of input, SIGTERM/SIGINT or a
broken output. Each ends the same way: in-flight requests are cancelled, services (VMs) are
closed, queued output is flushed within a bounded time, and `run` returns 0.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Protocol

import anyio
import anyio.abc
import structlog

import protocol
from protocol.framing import LineFramer
from protocol.methods import (
    METHODS,
    CancelParams,
    Capabilities,
    DroppedResponses,
    Empty,
    InitializeParams,
    InitializeResult,
    LimitRow,
    LimitsResult,
    PeerInfo,
    StatsResult,
)

from . import __version__
from .dispatcher import Dispatcher
from .hostcalls import HostCalls
from .limits import Limits
from .transport import Outbox, Sink, Source

log = structlog.get_logger()
SHUTDOWN_FLUSH_S = 0.5  # of the one second a host may wait for us to exit after EOF or SIGTERM


class Service(Protocol):
    """A group of methods with state to release at shutdown (the VM registry is one)."""

    def register(self, dispatcher: Dispatcher) -> None: ...

    async def close(self) -> None: ...

    def count(self) -> int: ...


class Server:
    def __init__(self, source: Source, sink: Sink, limits: Limits, *, handle_signals: bool = False) -> None:
        self._source = source
        self._sink = sink
        self.limits = limits
        self._handle_signals = handle_signals
        self._started = time.monotonic()
        self._stop_requested = False
        self._read_scope: anyio.CancelScope | None = None
        self._services: list[Service] = []
        self._service_factories: list[Callable[[Server], Service]] = []
        self._rows = [
            LimitRow(**{("class_" if key == "class" else key): value for key, value in row.items()})
            for row in limits.rows()
        ]
        self.outbox: Outbox
        self.dispatcher: Dispatcher
        self.hostcalls: HostCalls

    def add_service(self, factory: Callable[[Server], Service]) -> None:
        """`factory(server)` builds a service once the loop runs; it may use outbox and hostcalls."""
        self._service_factories.append(factory)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        """Serve until the session ends; `task_status` reports when methods are registered."""
        self.outbox = Outbox(self._sink, self.limits.protocol_outbox_bytes)
        self.hostcalls = HostCalls(self.limits, self.outbox.send)
        async with anyio.create_task_group() as tg:
            self.dispatcher = Dispatcher(self.limits, self.outbox.send, tg, self.hostcalls.deliver)
            self._register_session_methods()
            for factory in self._service_factories:
                service = factory(self)
                service.register(self.dispatcher)
                self._services.append(service)
            tg.start_soon(self._drain)
            if self._handle_signals:
                await tg.start(self._watch_signals)
            log.info("sidecar_started", version=__version__, protocol_version=protocol.PROTOCOL_VERSION)
            task_status.started()
            reason = await self._read_until_done()
            await self._shut_down(reason)
            tg.cancel_scope.cancel()
        return 0

    async def _read_until_done(self) -> str:
        framer = LineFramer(self.limits.protocol_frame_bytes)
        self._read_scope = anyio.CancelScope()
        if self._stop_requested:
            self._read_scope.cancel()
        with self._read_scope:
            while not self._stop_requested:
                await self.outbox.wait_for_room()
                chunk = await self._source.receive()
                if not chunk:
                    return "end_of_input"
                out = self.dispatcher.handle_lines(framer.feed(chunk))
                if out:
                    self.outbox.send(out)
            return "shutdown_requested"
        return "output_closed" if self.outbox.broken else "signal"

    def request_stop(self) -> None:
        self._stop_requested = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def _drain(self) -> None:
        await self.outbox.run_drainer()
        if self.outbox.broken:
            self.request_stop()

    async def _watch_signals(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info("signal_received", signal=signal.Signals(signum).name)
                self.request_stop()
                return

    async def _shut_down(self, reason: str) -> None:
        log.info("sidecar_stopping", reason=reason, in_flight=self.dispatcher.in_flight)
        with anyio.CancelScope(shield=True):
            self.dispatcher.cancel_all()
            for service in self._services:
                await service.close()
            with anyio.move_on_after(SHUTDOWN_FLUSH_S):
                await self.outbox.flush()
            self.outbox.close()
        log.info("sidecar_stopped", reason=reason, requests_served=self.dispatcher.requests_served)

    def _register_session_methods(self) -> None:
        route = self.dispatcher.route
        route("initialize", "inline", self._initialize)
        route("ping", "inline", lambda _: Empty())
        route("shutdown", "inline", self._shutdown)
        route("sidecar.stats", "inline", self._stats)
        route("sidecar.limits", "inline", lambda _: LimitsResult(limits=self._rows))
        route("$/cancelRequest", "inline", self._cancel)

    def _initialize(self, params: InitializeParams) -> InitializeResult:
        if params.client:
            log.info("host_identified", client=params.client.name, client_version=params.client.version or None)
        return InitializeResult(
            protocol_version=protocol.PROTOCOL_VERSION,
            server=PeerInfo(name="wasm-sidecar", version=__version__),
            capabilities=Capabilities(
                methods=sorted(name for name in self.dispatcher.methods() if METHODS[name].direction == "host_to_sidecar"),
                guest_abi=1,
                snapshot_formats=[],
            ),
            limits=self._rows,
        )

    def _shutdown(self, _: Empty) -> Empty:
        self._stop_requested = True  # the read loop stops once this answer is written
        self.dispatcher.closing = True
        return Empty()

    def _stats(self, _: Empty) -> StatsResult:
        return StatsResult(
            requests_served=self.dispatcher.requests_served,
            requests_in_flight=self.dispatcher.in_flight,
            responses_dropped=DroppedResponses(**self.hostcalls.dropped),
            host_calls_pending=self.hostcalls.pending,
            vms=sum(service.count() for service in self._services),
            uptime_ms=int((time.monotonic() - self._started) * 1000),
        )

    def _cancel(self, params: CancelParams) -> None:
        if not self.dispatcher.cancel(params.id):
            log.debug("cancel_ignored", request_id=params.id)

