"""The daemon as assembled: a server with the VM services wired to it, with real types.

Owns which services the sidecar serves and what `initialize` says they offer. The services
themselves (`sidecar.wiring`) import wasmtime and all that is built on it, most of a cold start,
and the session's own methods need none of it: so they are imported once the session serves, on
a worker thread (`Server.add_services(load=...)`), and the first request that needs them waits.
They are not imported from the process's first moment on a thread of their own: imports hold the
GIL, so two threads importing at once take as long as one after the other, and the main thread's
share of the CPU halves. Measured here (15 interleaved runs): the first answer came at a median
256 ms that way against 172 ms this way, and a `vm.create` sent after it at 265 ms against 257.
The CLI and the tests build the daemon here, so they run the same thing.
`wasm-sidecar mcp` is the same daemon with another front (`sidecar.mcp_server`) whose one service,
the MCP tools, drives the same registry, evals and hibernation.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from protocol import GUEST_ABI_VERSION
from protocol.methods import RuntimeInfo
from protocol.methods_vm import SNAPSHOT_FORMATS

from . import runtimes
from .limits import Limits
from .server import Server

if TYPE_CHECKING:
    from .mcp_server import McpServer
    from .state_dir import StateDir


def build_server(in_fd: int, out_fd: int, limits: Limits, *, handle_signals: bool = False,
                 state_dir: StateDir | None = None) -> Server:
    """`state_dir`: where VMs hibernate, already locked (the CLI opens it to refuse a directory in
    use before serving); without one, a private directory made when the services start."""
    server = Server(in_fd, out_fd, limits, handle_signals=handle_signals)
    server.add_services(lambda built: _wiring().vm_services(built, state_dir), load=_wiring,
                        capabilities=vm_capabilities)
    return server


def build_mcp_server(in_fd: int, out_fd: int, limits: Limits, *, handle_signals: bool = False,
                     state_dir: StateDir | None = None) -> McpServer:
    """The same daemon serving MCP: its tools are the one service, on the same VM registry, evals
    and hibernation; its session table lives in the state directory with the VMs (`state_dir`: as
    `build_server`'s). Of the VMs found there, only those a session names come back."""
    from .mcp_server import McpServer  # only this front pays for MCP's method table

    server = McpServer(in_fd, out_fd, limits, handle_signals=handle_signals)
    server.add_services(lambda built: _wiring().mcp_tools(built, state_dir), load=_wiring)
    return server


def _wiring() -> ModuleType:
    """`sidecar.wiring`, imported on first use. Importing it on a worker thread while the intake's
    threads serve is safe: Python's import lock is per module, so a module one thread is executing
    is waited for by the other, never run twice, and the layering (`tests/test_layers.py`: no
    cycles) leaves no two modules each waiting for the other."""
    from . import wiring

    return wiring


def vm_capabilities() -> dict[str, Any]:
    """What the VM services add to `initialize`'s capabilities, known without importing them:
    the guest ABI, the snapshot formats and the runtimes installed on disk."""
    return {
        "guest_abi": GUEST_ABI_VERSION,
        "snapshot_formats": list(SNAPSHOT_FORMATS),
        "runtimes": [RuntimeInfo(name=r.name, version=r.version, preimported=r.preimported)
                     for r in runtimes.installed()],
    }
