"""The VM services as the daemon wires them: what `sidecar.app` adds to a server once they are imported.

Owns what each service is given: one set of engines (and its epoch ticker), one module store, the
VM registry, WASI runs, Python evals, snapshots and hibernation, all sharing one `Runtime` whose
input reader is the server's intake; under `wasm-sidecar mcp`, the MCP tools on the same registry and evals. This
module imports wasmtime and everything built on it, so `sidecar.app` imports it only once the
session serves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .engines import Engines
from .evals import PythonEvals
from .hibernation import Hibernation
from .mcp_sessions import SessionTable
from .mcp_tools import McpTools
from .modules import ModuleStore
from .runs import WasiRuns
from .runtime import Runtime
from .server import Server, Service
from .snapshot_service import SnapshotService
from .state_dir import StateDir
from .vms import VmService

if TYPE_CHECKING:
    from .mcp_server import McpServer

# An MCP client does not answer `host.call`: a sandbox's `sidecar.host_call` fails at once instead.
NO_HOST_CALLS = "no host answers host calls under wasm-sidecar mcp"


def vm_services(server: Server, state_dir: StateDir | None = None) -> list[Service]:
    """Built once the server's loop runs (its intake, outbox and host calls exist by then).
    Hibernation comes first: it closes first at shutdown, hibernating idle VMs while the registry
    still holds them; the registry then disposes the rest and stops the engines' ticker last."""
    vms = _registry(server)
    snapshots = SnapshotService(vms, vms.runtime, vms.engines, server.limits)
    hibernation = Hibernation(vms, snapshots, vms.runtime, server.limits, state_dir or StateDir(None, server.limits))
    return [hibernation, vms, WasiRuns(vms.find, vms.runtime), PythonEvals(vms.find), snapshots]


def mcp_tools(server: McpServer, state_dir: StateDir | None = None) -> list[Service]:
    """The MCP front's one service, its tools, on the same VM registry, evals and hibernation; the
    session table lives in the state directory with the VMs, and of the VMs found there only those
    a session names come back."""
    vms = _registry(server, refuse_host_calls=NO_HOST_CALLS)
    directory = state_dir or StateDir(None, server.limits)
    sessions = SessionTable(directory, server.limits)
    snapshots = SnapshotService(vms, vms.runtime, vms.engines, server.limits)
    hibernation = Hibernation(vms, snapshots, vms.runtime, server.limits, directory,
                              claimed=sessions.vm_ids().__contains__)
    return [McpTools(server.session, vms, PythonEvals(vms.find), sessions, beneath=[hibernation, vms])]


def _registry(server: Server, *, refuse_host_calls: str | None = None) -> VmService:
    """The VM registry with its engines (ticking from now on) and module store, whose guests read
    input through the server's intake (`refuse_host_calls`: see `Runtime`)."""
    engines = Engines(server.limits)
    engines.start()
    runtime = Runtime(server.hostcalls, server.intake, server.outbox.send, refuse_host_calls)
    return VmService(server.limits, runtime, ModuleStore(server.limits, engines), engines)
