"""The daemon's life: wire intake, dispatcher, outbox and services together; shut down cleanly.

Owns the event loop's part (the outbox drainer, signals, slow methods' tasks through a portal),
the session methods (`initialize`, `ping`, `shutdown`, `sidecar.stats`, `sidecar.limits`,
`$/cancelRequest`) and the ways a session ends: `shutdown`, end of input, SIGTERM/SIGINT or a
broken output. Each ends the same way: in-flight requests are cancelled, services (VMs) are
closed, queued output is flushed within a bounded time, and `run` returns 0.

The session is served in two steps. `start` (no event loop yet) starts the intake's threads,
which answer the session methods from then on; `run` is the event loop. The CLI calls `start`
before it imports anyio and structlog (with asyncio beneath them: ~35 ms over msgspec alone), so a
host's `initialize` is answered while they load: anyio is imported by the methods that run on the
loop, not by this module. Whatever ends the session before the loop runs (end of input, a
`shutdown`, a signal) is kept and acted on as soon as it does.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import protocol
from protocol.errors import InternalError, RpcError
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
    MethodSpec,
    PeerInfo,
    Recycles,
    StatsResult,
)

from . import __version__
from .dispatcher import Dispatcher
from .hostcalls import HostCalls
from .intake import Intake
from .limits import Limits
from .logs import log
from .transport import FdSink, Outbox

if TYPE_CHECKING:
    import anyio.abc
    from anyio.from_thread import BlockingPortal

# Native stack a worker needs beyond the guest's own: the sidecar's Python and wasmtime's frames.
HOST_STACK_MARGIN = 8 << 20


class Service(Protocol):
    """A group of methods with state to release at shutdown (the VM registry is one)."""

    def routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        """`(method, kind, handler)` for each method it serves; kinds are `Dispatcher.route`'s."""
        ...

    async def close(self) -> None: ...

    def stats(self) -> dict[str, Any]:
        """Fields this service adds to `sidecar.stats`."""
        ...


class Server:
    """Serves the host on `in_fd`/`out_fd` (stdio in production, a socket pair in tests).

    A front (the MCP server is the other one) is a subclass with its own method table
    (`methods`) and session methods (`session_routes`); everything else is shared."""

    front: ClassVar[str] = "jsonrpc"
    methods: ClassVar[dict[str, MethodSpec]] = METHODS

    def __init__(self, in_fd: int, out_fd: int, limits: Limits, *, handle_signals: bool = False) -> None:
        self._in_fd = in_fd
        self._out_fd = out_fd
        self.limits = limits
        self._handle_signals = handle_signals
        self._started = time.monotonic()
        self._stop_reason: str | None = None
        self._stopped: anyio.Event | None = None
        self._services: list[Service] = []
        self._service_factories: list[Callable[[Server], list[Service]]] = []
        self._late: list[tuple[Callable[[Server], list[Service]], Callable[[], object]]] = []
        self._capability_sources: list[Callable[[], dict[str, Any]]] = []
        self._services_added = threading.Event()  # set once every service is in, or failed to load
        self._late_failure: RpcError | None = None
        self._serving = False
        # The loop's arrival, against an end reported before it (`_end_from_thread`).
        self._loop_lock = threading.Lock()
        self._portal: BlockingPortal | None = None
        self._ended_early: str | None = None
        self._signalled_early: int | None = None
        self._rows = [
            LimitRow(**{("class_" if key == "class" else key): value for key, value in row.items()})
            for row in limits.rows()
        ]
        self.outbox: Outbox
        self.dispatcher: Dispatcher
        self.hostcalls: HostCalls

    def add_services(self, factory: Callable[[Server], list[Service]], *, load: Callable[[], object] | None = None,
                     capabilities: Callable[[], dict[str, Any]] | None = None) -> None:
        """`factory(server)` builds services once the loop runs; they may use the server's
        `outbox`, `hostcalls` and `intake`, which exist from then on.

        `load`, if given, blocks until what `factory` needs is imported: it runs on a worker
        thread once the session serves, and the services are added when it returns; until then
        a request for a method of the server's table that nobody serves yet waits for them, and
        if `load` raises, it is answered -32603 naming what failed (so it does for every service
        while `start` serves before the loop runs). `capabilities()` gives the fields these
        services add to `initialize`'s, which must not wait for `load`."""
        if load is None:
            self._service_factories.append(factory)
        else:
            self._late.append((factory, load))
        if capabilities is not None:
            self._capability_sources.append(capabilities)

    def start(self) -> None:
        """Serve from the intake's threads from now on, before the event loop runs: the session
        methods at once, a service's once `run` has added it. Call it on the thread that then
        calls `run` (the outbox never blocks that one); `run` calls it if nobody did."""
        self._serving = True
        self.outbox = Outbox(FdSink(self._out_fd), self.limits.protocol_outbox_bytes)
        self.intake = Intake(
            self._in_fd,
            LineFramer(self.limits.protocol_frame_bytes),
            threads=self.limits.runner_worker_threads,
            on_end=self._end_from_thread,
            send=self.outbox.send,
            spin_s=self.limits.runner_input_spin_us / 1e6,
        )
        self.hostcalls = HostCalls(self.limits, self.outbox.send)
        self.dispatcher = Dispatcher(self.limits, self.intake.answer, self.hostcalls.deliver, methods=self.methods)
        for method, kind, handler in self.session_routes():
            self.dispatcher.route(method, kind, handler)  # type: ignore[arg-type]
        if self._service_factories or self._late:
            self.dispatcher.await_routes = self._await_services
        else:
            self._services_added.set()
        if self._handle_signals:  # until the loop watches them: `_watch_signals`
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._signalled_before_the_loop)
        log.info("sidecar_started", version=__version__, front=self.front, protocol_version=protocol.PROTOCOL_VERSION)
        self.intake.start(self.dispatcher, self.limits.vm_stack_bytes + HOST_STACK_MARGIN)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] | None = None) -> int:
        """Serve until the session ends; `task_status` reports when the sidecar is serving."""
        import anyio
        from anyio.from_thread import BlockingPortal

        self._stopped = anyio.Event()
        if not self._serving:
            self.start()
        async with BlockingPortal() as portal, anyio.create_task_group() as tg:
            self.dispatcher.attach_loop(portal)
            for factory in self._service_factories:
                self._add(factory)
            if not self._late:
                self._services_added.set()
                self.dispatcher.await_routes = None
            tg.start_soon(self._drain)
            if self._handle_signals:
                await tg.start(self._watch_signals)
            with self._loop_lock:
                self._portal = portal
                ended = self._ended_early
            if ended is not None:
                self.request_stop(ended)
            if task_status is not None:
                task_status.started()
            if self._late:
                tg.start_soon(self._add_late_services)
            await self._stopped.wait()
            await self._shut_down(self._stop_reason or "unknown")
            tg.cancel_scope.cancel()
        return 0

    def _add(self, factory: Callable[[Server], list[Service]]) -> None:
        for service in factory(self):
            for method, kind, handler in service.routes():
                self.dispatcher.route(method, kind, handler)  # type: ignore[arg-type]
            self._services.append(service)

    async def _add_late_services(self) -> None:
        """Wait (on a worker thread) for the late services' imports, then add them on the loop."""
        import anyio

        try:
            for factory, load in self._late:
                await anyio.to_thread.run_sync(load, abandon_on_cancel=True)
                if self._stop_reason is not None:  # a service built now would never be closed
                    ended = f"the session ended ({self._stop_reason})"
                    self._late_failure = InternalError(f"the VM services were not added: {ended}", failed=ended)
                    return
                self._add(factory)
            self.dispatcher.await_routes = None
            log.debug("services_loaded", uptime_ms=int((time.monotonic() - self._started) * 1000))
        except Exception as exc:
            failed = f"{type(exc).__name__}: {exc}"
            log.error("services_failed", error=failed, exc_info=exc)
            self._late_failure = InternalError(f"the VM services failed to load ({failed})", failed=failed)
        finally:
            self._services_added.set()

    async def services_loaded(self) -> None:
        """Returns once every service is added (or failed to load): for code in this process that
        needs the whole daemon, as tests that replace a route do; a host never needs it."""
        import anyio

        if not self._services_added.is_set():
            await anyio.to_thread.run_sync(self._services_added.wait, abandon_on_cancel=True)

    def _await_services(self) -> None:
        """The dispatcher's wait for a method nobody serves yet, on the thread that read it. It
        keeps the reader role while it waits (tens of ms, once per process): frames after this one
        are handled after it, as they would be had the services been there, so an end of input
        read next cannot end the session under a request the host sent before it."""
        if not self._services_added.is_set():
            self.intake.send_gathered()
            self._services_added.wait()
        if self._late_failure is not None:
            raise self._late_failure

    def request_stop(self, reason: str) -> None:
        """On the event loop: end the session (the first reason given is the one logged)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        assert self._stopped is not None
        self._stopped.set()

    def _end_from_thread(self, reason: str) -> None:
        with self._loop_lock:
            portal = self._portal
            if portal is None:  # the loop does not run yet: `run` stops once it does
                self._ended_early = self._ended_early or reason
                return
        with contextlib.suppress(RuntimeError):  # the portal is gone: the session already ended
            portal.start_task_soon(self._request_stop_async, reason)

    def _signalled_before_the_loop(self, signum: int, _frame: object) -> None:
        """A SIGTERM or SIGINT while the loop is still being set up: handled once it runs."""
        if self._signalled_early is None:
            self._signalled_early = signum

    async def _request_stop_async(self, reason: str) -> None:
        self.request_stop(reason)

    async def _drain(self) -> None:
        await self.outbox.run_drainer()
        if self.outbox.broken:
            self.request_stop("output_closed")

    async def _watch_signals(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        import anyio

        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            # Read after the receiver replaced `start`'s handlers: a signal is seen by one of them.
            if self._signalled_early is not None:
                self._on_signal(self._signalled_early)
                return
            async for signum in signals:
                self._on_signal(signum)
                return

    def _on_signal(self, signum: int) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        self.request_stop("signal")

    async def _shut_down(self, reason: str) -> None:
        import anyio

        log.info("sidecar_stopping", reason=reason, in_flight=self.dispatcher.in_flight)
        with anyio.CancelScope(shield=True):
            self.intake.stop()
            self.dispatcher.cancel_all()
            for service in self._services:
                await service.close()
            half_s = self.limits.protocol_shutdown_ms / 2000  # services took the other half
            with anyio.move_on_after(half_s):
                await self.outbox.flush()
            self.outbox.close()
            await anyio.to_thread.run_sync(self.intake.join, half_s)
        log.info("sidecar_stopped", reason=reason, requests_served=self.dispatcher.requests_served)

    def session_routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        """The session's own methods, as `Service.routes`; the dispatcher exists when it is asked."""
        return [
            ("initialize", "inline", self._initialize),
            ("ping", "inline", lambda _: Empty()),
            ("shutdown", "inline", self._shutdown),
            ("sidecar.stats", "inline", self._stats),
            ("sidecar.limits", "inline", lambda _: LimitsResult(limits=self._rows)),
            ("$/cancelRequest", "inline", self._cancel),
        ]

    def _initialize(self, params: InitializeParams) -> InitializeResult:
        if params.client:
            log.info("host_identified", client=params.client.name, client_version=params.client.version or None)
        return InitializeResult(
            protocol_version=protocol.PROTOCOL_VERSION,
            server=PeerInfo(name="wasm-sidecar", version=__version__),
            capabilities=self._capabilities(),
            limits=self._rows,
        )

    def _capabilities(self) -> Capabilities:
        fields: dict[str, Any] = {}
        for source in self._capability_sources:
            fields.update(source())
        served = set(self.dispatcher.methods())
        if not self._services_added.is_set():  # what nobody serves yet, the services still loading will
            served.update(self.methods)
        offered = sorted(name for name in served if self.methods[name].direction == "host_to_sidecar")
        return Capabilities(methods=offered, **fields)

    def _shutdown(self, _: Empty) -> Empty:
        self.intake.closing = True  # intake stops reading once this answer is written
        return Empty()

    def _stats(self, _: Empty) -> StatsResult:
        fields: dict[str, Any] = {"engines": 0, "vms": 0, "vms_starting": 0, "vm_calls": 0, "vm_memory_bytes": 0,
                                  "instances_recycled": Recycles.of({}), "hibernations": 0, "wakes": 0,
                                  "state_bytes": 0, "state_quarantined": 0, "spare_instances": 0}
        for service in self._services:
            fields.update(service.stats())
        return StatsResult(
            requests_served=self.dispatcher.requests_served,
            requests_in_flight=self.dispatcher.in_flight,
            responses_dropped=DroppedResponses(**self.hostcalls.dropped),
            host_calls_pending=self.hostcalls.pending,
            uptime_ms=int((time.monotonic() - self._started) * 1000),
            **fields,
        )

    def _cancel(self, params: CancelParams) -> None:
        if not self.dispatcher.cancel(params.id):
            log.debug("cancel_ignored", request_id=params.id)

