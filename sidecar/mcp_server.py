"""`wasm-sidecar mcp`: the daemon's server, serving the Model Context Protocol instead of its own.

Owns the MCP session's methods: `initialize` (the revision negotiated as MCP's lifecycle says: the
one asked for if this server speaks it, else its newest, and the client decides), `ping`,
`notifications/initialized` and `notifications/cancelled` (the named request's work stops as a
`$/cancelRequest` stops it, but, as MCP asks, it gets no response). Everything else is the daemon's:
the process, stdio and its framing, the intake's threads, the dispatcher (so hostile frames get
the same JSON-RPC errors and serving goes on), limits, logs and shutdown at end of input. The tools
are `sidecar.mcp_tools`, a service like any other. Knows nothing about what a tool does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from protocol.errors import InvalidRequestError
from protocol.mcp import (
    MCP_METHODS,
    CancelledParams,
    Empty,
    Implementation,
    InitializeParams,
    InitializeResult,
    ServerCapabilities,
    ToolsCapability,
    negotiate,
)
from protocol.methods import MethodSpec

from . import __version__
from .limits import Limits
from .logs import log
from .mcp_session import McpSession, instructions
from .server import Server


class McpServer(Server):
    front: ClassVar[str] = "mcp"
    methods: ClassVar[dict[str, MethodSpec]] = MCP_METHODS

    def __init__(self, in_fd: int, out_fd: int, limits: Limits, *, handle_signals: bool = False) -> None:
        super().__init__(in_fd, out_fd, limits, handle_signals=handle_signals)
        self.session = McpSession()

    def session_routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        return [
            ("initialize", "inline", self._initialize_mcp),
            ("ping", "inline", lambda _: Empty()),
            ("notifications/initialized", "inline", lambda _: None),
            ("notifications/cancelled", "inline", self._cancelled),
        ]

    def _initialize_mcp(self, params: InitializeParams) -> InitializeResult:
        if self.session.revision is not None:
            raise InvalidRequestError("the session is initialized already", revision=self.session.revision)
        revision = negotiate(params.protocol_version)
        self.session.revision = revision
        log.info("host_identified", client=params.client_info.name, client_version=params.client_info.version,
                 requested_revision=params.protocol_version, revision=revision)
        return InitializeResult(
            protocol_version=revision,
            capabilities=ServerCapabilities(tools=ToolsCapability()),
            server_info=Implementation(name="wasm-sidecar", title="wasm-sidecar Python sandbox", version=__version__),
            instructions=instructions(),
        )

    def _cancelled(self, params: CancelledParams) -> None:
        if not self.dispatcher.cancel(params.request_id, answer=False):
            log.debug("cancel_ignored", request_id=params.request_id)
