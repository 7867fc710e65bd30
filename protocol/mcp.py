"""The Model Context Protocol as `wasm-sidecar mcp` speaks it: revisions, messages, tools.

Owns the MCP messages the sidecar's MCP front reads and writes (camelCase on the wire, as MCP
spells it), the handshake revisions it negotiates and what each revision changes, `MCP_METHODS`
(the method table that front routes by, in place of `protocol.methods.METHODS`), and the tools
with the JSON Schemas of their arguments and structured results, generated from the types here.

MCP messages are read leniently, unlike the sidecar's own contract: MCP's schema lets objects carry
more members (and `_meta` anywhere), and clients send members of revisions newer than the one in
use, so unknown members are ignored. A tool's arguments are the exception: their schema says
`additionalProperties: false`, and an unknown argument is refused. Knows nothing about how a tool runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from .envelope import RequestId
from .methods import MethodSpec
from .methods_runtime import EvalError
from .methods_session import Count
from .methods_vm import Millis, TimeoutMs, VmId

# Handshake revisions, newest first. An `initialize` asking for one of them gets it back; any other
# request gets the newest, and the client decides whether it can speak that (MCP's lifecycle rule).
REVISIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
LATEST = REVISIONS[0]
# From this revision on, tools declare `outputSchema` and results carry `structuredContent`.
STRUCTURED_SINCE = "2025-06-18"
# From this revision on, arguments that fail the input schema are a tool error the model can read
# and correct (SEP-1303), not a -32602 protocol error.
ARGUMENT_ERRORS_AS_RESULTS_SINCE = "2025-11-25"


def negotiate(requested: str) -> str:
    """The revision to answer an `initialize` asking for `requested` with."""
    return requested if requested in REVISIONS else LATEST


def at_least(revision: str, since: str) -> bool:
    """Whether negotiated `revision` (one of `REVISIONS`) has what revision `since` brought."""
    return REVISIONS.index(revision) <= REVISIONS.index(since)


class Mcp(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="camel"):
    """Base of MCP messages: camelCase members, unknown members ignored (see the module docstring)."""


MetaMember = dict[str, Any] | UnsetType  # `_meta`: MCP lets any message carry one


def _meta() -> Any:
    return msgspec.field(default=UNSET, name="_meta")


class Implementation(Mcp):
    name: str
    version: str
    title: str | UnsetType = UNSET


class InitializeParams(Mcp, kw_only=True):
    protocol_version: str
    capabilities: dict[str, Any] = msgspec.field(default_factory=dict)
    client_info: Implementation
    meta: MetaMember = _meta()


class ToolsCapability(Mcp):
    list_changed: bool = False


class ServerCapabilities(Mcp):
    tools: ToolsCapability


class InitializeResult(Mcp):
    protocol_version: str
    capabilities: ServerCapabilities
    server_info: Implementation
    instructions: str | UnsetType = UNSET


class Empty(Mcp):
    """Params of `ping` and `notifications/initialized`, and `ping`'s result."""

    meta: MetaMember = _meta()


class CancelledParams(Mcp):
    """`notifications/cancelled`: the named request's work stops and it gets no response."""

    request_id: RequestId
    reason: str | UnsetType = UNSET
    meta: MetaMember = _meta()


class ListToolsParams(Mcp):
    cursor: str | UnsetType = UNSET
    meta: MetaMember = _meta()


class ToolAnnotations(Mcp):
    """Hints for the host; `open_world_hint` false: a sandbox reaches nothing outside itself."""

    title: str
    read_only_hint: bool
    destructive_hint: bool
    idempotent_hint: bool
    open_world_hint: bool


class Tool(Mcp, kw_only=True):
    name: str
    title: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | UnsetType = UNSET
    annotations: ToolAnnotations


class ListToolsResult(Mcp):
    tools: list[Tool]


class CallToolParams(Mcp):
    name: str
    arguments: msgspec.Raw | UnsetType = UNSET
    meta: MetaMember = _meta()


class TextContent(Mcp):
    type: Literal["text"]
    text: str


class CallToolResult(Mcp):
    """`is_error`: the tool ran and failed (a Python exception, a limit); the model reads why."""

    content: list[TextContent]
    structured_content: Any = UNSET
    is_error: bool = False


# -- the tools: arguments and structured results (snake_case, as the tools are specified) ----------


class Args(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of tool arguments and results: strict, like the sidecar's own contract."""


SessionName = Annotated[str, Meta(
    pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
    description="A session's name: letters, digits, `_`, `.` and `-`, starting with a letter or digit.",
)]


class RunPythonArgs(Args):
    """Without `session`, the code runs in a fresh interpreter that nothing else sees; with it, in the
    named session's (made on first use), whose names persist across calls."""

    code: str
    session: SessionName | UnsetType = UNSET
    timeout_ms: TimeoutMs | UnsetType = UNSET


class SessionArgs(Args):
    session: SessionName


class NoArgs(Args):
    pass


class Failure(Args):
    """Why the code did not finish: a timeout or a limit (named, with the variable that raises it),
    a crashed interpreter, a runtime that is not installed. `session_lost`: the session's
    interpreter was replaced by a fresh one, or its hibernated state failed validation on waking
    (the next call starts the session afresh), so its names are gone."""

    kind: str
    message: str
    limit: str | UnsetType = UNSET
    env: str | None | UnsetType = UNSET
    capacity: float | UnsetType = UNSET
    observed: float | UnsetType = UNSET
    session_lost: bool = False


class RunPythonOutput(Args):
    """`vm.eval`'s result (`status` `ok`, `error` for an exception, `exit` for `SystemExit`), or
    `failed` with `failure` when the code did not finish."""

    status: Literal["ok", "error", "exit", "failed"]
    stdout: str
    stderr: str
    value: str | UnsetType = UNSET
    error: EvalError | UnsetType = UNSET
    exit_code: int | UnsetType = UNSET
    elapsed_ms: Millis | UnsetType = UNSET
    session: str | UnsetType = UNSET
    failure: Failure | UnsetType = UNSET


class ResetSessionOutput(Args):
    """`existed` false: there was no such session (resetting it is then a no-op)."""

    session: str
    existed: bool


class SessionInfo(Args):
    """One session. `resident` is false while its VM is hibernated (its interpreter's state on disk;
    the session's next call wakes it with its variables); `last_used` (RFC 3339, UTC) is when a call
    last reached it."""

    session: str
    vm_id: VmId
    state: Literal["idle", "busy"]
    calls: Count
    memory_bytes: Count
    resident: bool
    last_used: str


class ListSessionsOutput(Args):
    """The sessions, and how many the process may hold (`runner_mcp_sessions`)."""

    sessions: list[SessionInfo]
    capacity: Count


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    title: str
    description: str
    arguments: type[Args]
    output: type[Args]
    read_only: bool
    destructive: bool
    idempotent: bool

    def tool(self, revision: str, description: str) -> Tool:
        """This tool as `tools/list` shows it to a client of `revision`."""
        return Tool(
            name=self.name, title=self.title, description=description, input_schema=schema_of(self.arguments),
            output_schema=schema_of(self.output) if at_least(revision, STRUCTURED_SINCE) else UNSET,
            annotations=ToolAnnotations(title=self.title, read_only_hint=self.read_only,
                                        destructive_hint=self.destructive, idempotent_hint=self.idempotent,
                                        open_world_hint=False),
        )


@cache  # what `tools/list` sends every time; never mutated
def schema_of(struct: type) -> dict[str, Any]:
    """A self-contained JSON Schema whose root is `struct`'s object schema (MCP wants `type: object`
    at the root), with what it refers to under `$defs`."""
    _, defs = msgspec.json.schema_components([struct], ref_template="#/$defs/{name}")
    root = dict(defs.pop(struct.__name__))
    return {**root, "$defs": defs} if defs else root


TOOLS: dict[str, ToolSpec] = {spec.name: spec for spec in [
    ToolSpec("run_python", "Run Python",
             "Run Python 3.11 code in a WebAssembly sandbox and return its stdout, stderr, the repr of a "
             "trailing expression (value) and any exception. Without `session` each call gets a fresh "
             "interpreter; with `session` the named interpreter is made on first use and keeps its names "
             "across calls. The sandbox has the standard library but no network, no subprocesses and no "
             "files of the host. A timeout or a limit fails the call and names the limit.",
             RunPythonArgs, RunPythonOutput, read_only=False, destructive=False, idempotent=False),
    ToolSpec("reset_session", "Reset a Python session",
             "Forget a named Python session and everything it defined; the next run_python naming it "
             "starts afresh. Resetting a session that does not exist is a no-op.",
             SessionArgs, ResetSessionOutput, read_only=False, destructive=True, idempotent=True),
    ToolSpec("list_sessions", "List Python sessions",
             "List the named Python sessions that exist, with their calls and memory, and how many may exist.",
             NoArgs, ListSessionsOutput, read_only=True, destructive=False, idempotent=True),
]}  # fmt: skip


def _method(name: str, params: type, result: Any, summary: str) -> MethodSpec:
    return MethodSpec(name, params, result, "host_to_sidecar", result is None, summary)


MCP_METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in [
    _method("initialize", InitializeParams, InitializeResult,
            "Negotiate the revision; learn the server's capabilities, identity and instructions."),
    _method("ping", Empty, Empty, "Liveness check; answers `{}`."),
    _method("notifications/initialized", Empty, None, "The client is ready; nothing is answered."),
    _method("notifications/cancelled", CancelledParams, None, "Stop a request in flight; it gets no response."),
    _method("tools/list", ListToolsParams, ListToolsResult, "The tools, with their input and output schemas."),
    _method("tools/call", CallToolParams, CallToolResult, "Call a tool; a failure of the tool is a result."),
]}  # fmt: skip
