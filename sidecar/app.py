"""The daemon as assembled: a server with the VM services wired to it, with real types.

Owns which services the sidecar serves and what each is given: one set of engines (and its epoch
ticker), one module store, the VM registry, WASI runs, Python evals and snapshots, all sharing one
`Runtime` whose input reader is the server's intake. The CLI and the tests build the daemon here,
so they run the same thing. `wasm-sidecar mcp` is the same daemon with another front
(`sidecar.mcp_server`) whose one service, the MCP tools, drives the same registry, evals and
hibernation.
"""

from __future__ import annotations

from .engines import Engines
from .evals import PythonEvals
from .hibernation import Hibernation
from .limits import Limits
from .mcp_server import McpServer
from .mcp_sessions import SessionTable
from .mcp_tools import McpTools
from .modules import ModuleStore
from .runs import WasiRuns
from .runtime import Runtime
from .server import Server, Service
from .snapshot_service import SnapshotService
from .state_dir import StateDir
from .vms import VmService


def build_server(in_fd: int, out_fd: int, limits: Limits, *, handle_signals: bool = False,
                 state_dir: StateDir | None = None) -> Server:
    """`state_dir`: where VMs hibernate, already locked (the CLI opens it to refuse a directory in
    use before serving); without one, a private directory made when the services start."""
    server = Server(in_fd, out_fd, limits, handle_signals=handle_signals)
    server.add_services(lambda server: vm_services(server, state_dir))
    return server


# An MCP client does not answer `host.call`: a sandbox's `sidecar.host_call` fails at once instead.
NO_HOST_CALLS = "no host answers host calls under wasm-sidecar mcp"


def build_mcp_server(in_fd: int, out_fd: int, limits: Limits, *, handle_signals: bool = False,
                     state_dir: StateDir | None = None) -> McpServer:
    """The same daemon serving MCP: its tools are the one service, on the same VM registry, evals
    and hibernation; its session table lives in the state directory with the VMs (`state_dir`: as
    `build_server`'s). Of the VMs found there, only those a session names come back."""
    server = McpServer(in_fd, out_fd, limits, handle_signals=handle_signals)

    def tools(_: Server) -> list[Service]:
        vms = _registry(server, refuse_host_calls=NO_HOST_CALLS)
        directory = state_dir or StateDir(None, server.limits)
        sessions = SessionTable(directory, server.limits)
        snapshots = SnapshotService(vms, vms.runtime, vms.engines, server.limits)
        hibernation = Hibernation(vms, snapshots, vms.runtime, server.limits, directory,
                                  claimed=sessions.vm_ids().__contains__)
        return [McpTools(server.session, vms, PythonEvals(vms.find), sessions, beneath=[hibernation, vms])]

    server.add_services(tools)
    return server


def vm_services(server: Server, state_dir: StateDir | None = None) -> list[Service]:
    """Built once the server's loop runs (its intake, outbox and host calls exist by then).
    Hibernation comes first: it closes first at shutdown, hibernating idle VMs while the registry
    still holds them; the registry then disposes the rest and stops the engines' ticker last."""
    vms = _registry(server)
    snapshots = SnapshotService(vms, vms.runtime, vms.engines, server.limits)
    hibernation = Hibernation(vms, snapshots, vms.runtime, server.limits, state_dir or StateDir(None, server.limits))
    return [hibernation, vms, WasiRuns(vms.find, vms.runtime), PythonEvals(vms.find), snapshots]


def _registry(server: Server, *, refuse_host_calls: str | None = None) -> VmService:
    """The VM registry with its engines (ticking from now on) and module store, whose guests read
    input through the server's intake (`refuse_host_calls`: see `Runtime`)."""
    engines = Engines(server.limits)
    engines.start()
    runtime = Runtime(server.hostcalls, server.intake, server.outbox.send, refuse_host_calls)
    return VmService(server.limits, runtime, ModuleStore(server.limits, engines), engines)
