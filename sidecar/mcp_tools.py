"""The MCP front's tools, `run_python`, `reset_session` and `list_sessions`, on the VM services.

Owns the named sessions (a name and the id of an ordinary stateful Python VM in the registry,
at most `runner_mcp_sessions` of them, in a `sidecar.mcp_sessions` table that outlives the process
with a named state directory), the one stateless Python VM whose recycled instances give
every session-less `run_python` a pristine interpreter, and turning what `vm.eval` ends with into a
tool result: its result (`isError` when the code raised), or its error (a timeout, a limit, a lost
interpreter) as a tool error that names the limit. A session holds nothing but its VM's id and
reaches the VM only through the registry (`VmService.find` by way of `vm.eval`, `vm_list`,
`vm_dispose`), so what the registry does to an idle VM (hibernation) applies to sessions without
code here.

Session VMs are made on the thread that handles the call, as `vm.create` makes them (the thread
first hands input reading on, per `sidecar.intake`), one at a time: two first uses of one name
make one VM. Knows nothing of the wire or of the MCP session beyond the negotiated revision.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import msgspec
import structlog

from protocol.decoding import decode_params
from protocol.errors import InvalidParamsError, InvalidSnapshotError, RpcError, VmNotFoundError
from protocol.mcp import (
    ARGUMENT_ERRORS_AS_RESULTS_SINCE,
    STRUCTURED_SINCE,
    TOOLS,
    CallToolParams,
    CallToolResult,
    Failure,
    ListSessionsOutput,
    ListToolsParams,
    ListToolsResult,
    NoArgs,
    ResetSessionOutput,
    RunPythonArgs,
    RunPythonOutput,
    SessionArgs,
    SessionInfo,
    TextContent,
    at_least,
)
from protocol.methods import Empty, EvalParams, EvalResult, VmCreateParams, VmDisposeParams, decoder_for

from . import runtimes
from .completion import Completion
from .evals import PythonEvals
from .mcp_session import RUNTIME_MISSING, McpSession
from .mcp_sessions import SessionTable
from .runtimes import PYTHON
from .vms import VmService

log = structlog.get_logger()
_encoder = msgspec.json.Encoder()
class Closes(Protocol):
    """What the tools need of a service beneath them (the server's `Service`, which this layer
    cannot import)."""

    async def close(self) -> None: ...


class McpTools:
    """The MCP front's one service: `tools/list` and `tools/call`. `beneath` are the services the
    tools stand on (the registry among them), whose methods the front does not serve: closed in
    that order at shutdown, as the daemon closes its services."""

    def __init__(self, session: McpSession, vms: VmService, evals: PythonEvals, sessions: SessionTable,
                 beneath: Sequence[Closes]) -> None:
        """`sessions`: the table as read at start; those whose VM the registry does not hold (it did
        not come back from the state directory) are forgotten."""
        self._session = session
        self._vms = vms
        self._evals = evals
        self._beneath = beneath
        self._making = threading.Lock()  # one VM made at a time (see the module docstring)
        self._sessions = sessions
        self._sessions.retain(self._live())
        if len(sessions):
            log.info("mcp_sessions_restored", sessions=len(sessions))
        self._fresh: str | None = None  # the stateless VM of session-less calls, made on first use
        self._run: dict[str, Callable[[Any, Completion, str], None]] = {
            "run_python": self._run_python, "reset_session": self._reset_session,
            "list_sessions": self._list_sessions,
        }

    def routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        return [("tools/list", "inline", self.list_tools), ("tools/call", "deferred", self.call_tool)]

    def stats(self) -> dict[str, Any]:
        return {}  # the MCP front has no `sidecar.stats`

    async def close(self) -> None:
        for service in self._beneath:  # the registry disposes the sessions' VMs with every other
            await service.close()

    def list_tools(self, _: ListToolsParams) -> ListToolsResult:
        revision = self._session.require()
        missing = runtimes.find(PYTHON) is None
        return ListToolsResult(tools=[
            spec.tool(revision, f"{spec.description} {RUNTIME_MISSING}" if missing else spec.description)
            for spec in TOOLS.values()
        ])

    def call_tool(self, params: CallToolParams, reply: Completion) -> None:
        revision = self._session.require()
        spec = TOOLS.get(params.name)
        if spec is None:
            raise InvalidParamsError(f"unknown tool {params.name!r}", path="$.name", tools=list(TOOLS))
        try:
            arguments = decode_params(decoder_for(spec.arguments), params.arguments)
        except InvalidParamsError as exc:
            exc.details["path"] = "$.arguments" + exc.details["path"][1:]
            exc.details["tool"] = spec.name
            if not at_least(revision, ARGUMENT_ERRORS_AS_RESULTS_SINCE):
                raise
            reply.result(_text_error(f"{exc.message} (at {exc.details['path']})"))
            return
        self._run[spec.name](arguments, reply, revision)

    # -- the tools ---------------------------------------------------------------------------

    def _run_python(self, args: RunPythonArgs, reply: Completion, revision: str) -> None:
        session = args.session if isinstance(args.session, str) else None
        outcome = _EvalOutcome(reply, revision, session)
        try:
            vm_id = self._session_vm(session, reply) if session is not None else self._fresh_vm(reply)
            if vm_id is None:
                outcome.failed(Failure(kind="runtime_not_installed", message=RUNTIME_MISSING))
                return
            self._evals.vm_eval(EvalParams(vm_id=vm_id, code=args.code, timeout_ms=args.timeout_ms), outcome)
        except RpcError as exc:
            outcome.error(exc)

    def _reset_session(self, args: SessionArgs, reply: Completion, revision: str) -> None:
        vm_id = self._sessions.pop(args.session)  # the table first: a crash now leaves no session on the VM
        if vm_id is not None:
            try:
                self._vms.vm_dispose(VmDisposeParams(vm_id=vm_id))
            except VmNotFoundError:
                pass  # the registry ended it already (at shutdown)
            log.info("mcp_session_reset", session=args.session, vm_id=vm_id)
        reply.result(_result(ResetSessionOutput(session=args.session, existed=vm_id is not None), revision))

    def _list_sessions(self, _: NoArgs, reply: Completion, revision: str) -> None:
        sessions = self._sessions.rows()
        rows = {row.vm_id: row for row in self._vms.vm_list(Empty()).vms}
        listed = [SessionInfo(session=name, vm_id=vm_id, state=rows[vm_id].state, calls=rows[vm_id].calls,
                              memory_bytes=rows[vm_id].memory_bytes, resident=rows[vm_id].resident,
                              last_used=rows[vm_id].last_used)
                  for name, vm_id in sorted(sessions.items()) if vm_id in rows]
        output = ListSessionsOutput(sessions=listed, capacity=self._vms.limits.runner_mcp_sessions)
        reply.result(_result(output, revision))

    # -- VMs -----------------------------------------------------------------------------------

    def _session_vm(self, name: str, reply: Completion) -> str | None:
        """The VM of session `name`, made on first use (None: the runtime is not installed)."""
        vm_id = self._sessions.get(name)
        if vm_id is not None:
            try:
                self._vms.find(vm_id)
                return vm_id
            except VmNotFoundError:  # its hibernated state failed validation on waking: the VM is gone
                self._sessions.retain(self._live())
        self._vms.runtime.reader.yield_reading()  # waiting for another thread's VM, or making one
        with self._making:
            vm_id = self._sessions.get(name)
            count = len(self._sessions) + 1
            if vm_id is not None:  # made while this thread waited
                return vm_id
            if count > self._vms.limits.runner_mcp_sessions:
                raise self._vms.limits.exceeded("runner_mcp_sessions", count, session=name)
            vm_id = self._make_vm("stateful", reply)
            if vm_id is not None:
                self._sessions.add(name, vm_id)
                log.info("mcp_session_created", session=name, vm_id=vm_id)
            return vm_id

    def _live(self) -> set[str]:
        return {row.vm_id for row in self._vms.vm_list(Empty()).vms}

    def _fresh_vm(self, reply: Completion) -> str | None:
        if self._fresh is not None:
            return self._fresh
        self._vms.runtime.reader.yield_reading()
        with self._making:
            if self._fresh is None:
                self._fresh = self._make_vm("stateless", reply)
            return self._fresh

    def _make_vm(self, mode: Literal["stateful", "stateless"], reply: Completion) -> str | None:
        """A Python VM made as `vm.create {runtime: "python", mode}` makes one, or None when the
        runtime is not installed. A cancel of the call stops a bake in progress; a VM that gets
        made is kept even so (it is a session's, or shared), so none is ever left unlisted."""
        if runtimes.find(PYTHON) is None:
            return None
        made = _Made(reply)
        self._vms.vm_create(VmCreateParams(runtime=PYTHON, mode=mode), made)
        return made.vm_id


class _Made:
    """The `Completion` of the `vm.create` a tool call makes: it keeps the VM's id instead of answering,
    and passes the call's cancel through, so a cancel stops a bake as it stops `vm.create`'s."""

    def __init__(self, reply: Completion) -> None:
        self._reply = reply
        self.id = reply.id
        self.method = reply.method
        self.vm_id: str | None = None

    @property
    def done(self) -> bool:
        return self._reply.done

    @property
    def on_cancel(self) -> Callable[[], None] | None:
        return self._reply.on_cancel

    @on_cancel.setter
    def on_cancel(self, hook: Callable[[], None] | None) -> None:
        self._reply.on_cancel = hook

    def result(self, value: Any) -> None:
        raise AssertionError("vm.create answers through result_of")

    def error(self, error: RpcError) -> None:
        raise error

    def result_of(self, commit: Callable[[], Any]) -> bool:
        self.vm_id = commit().vm_id
        return True


class _EvalOutcome(_Made):
    """The `Completion` of a `run_python`'s `vm.eval`: whatever the eval ends with answers the tool
    call as a tool result, a failure included."""

    def __init__(self, reply: Completion, revision: str, session: str | None) -> None:
        super().__init__(reply)
        self._revision = revision
        self._session = session

    def result(self, value: EvalResult) -> None:
        self._reply.result(self._from_eval(value))

    def result_of(self, commit: Callable[[], Any]) -> bool:
        return self._reply.result_of(lambda: self._from_eval(commit()))

    def error(self, error: RpcError) -> None:
        details = error.details
        detail = details.get("message")
        self.failed(Failure(
            kind=error.kind, message=f"{error.message}: {detail}" if isinstance(detail, str) else error.message,
            limit=details.get("limit", msgspec.UNSET), env=details.get("env", msgspec.UNSET),
            capacity=details.get("capacity", msgspec.UNSET), observed=details.get("observed", msgspec.UNSET),
            # A session's hibernated state that failed validation on waking took its VM with it.
            session_lost=details.get("session") == "lost" or isinstance(error, InvalidSnapshotError),
        ))

    def failed(self, failure: Failure) -> None:
        output = RunPythonOutput(status="failed", stdout="", stderr="", session=self._session or msgspec.UNSET,
                                 failure=failure)
        self._reply.result(_result(output, self._revision, is_error=True))

    def _from_eval(self, value: EvalResult) -> CallToolResult:
        output = RunPythonOutput(
            status=value.status, stdout=value.stdout, stderr=value.stderr, value=value.value, error=value.error,
            exit_code=value.exit_code, elapsed_ms=value.elapsed_ms, session=self._session or msgspec.UNSET,
        )
        return _result(output, self._revision, is_error=value.status == "error")


def _result(output: Any, revision: str, *, is_error: bool = False) -> CallToolResult:
    """A tool's output as text (its JSON, which MCP asks for alongside structured content) and, for
    revisions that have it, as structured content."""
    text = _encoder.encode(output).decode()
    structured = output if at_least(revision, STRUCTURED_SINCE) else msgspec.UNSET
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=structured,
                          is_error=is_error)


def _text_error(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)
