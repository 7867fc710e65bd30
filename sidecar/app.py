"""The daemon as assembled: a server with the VM services wired to it, with real types.

Owns which services the sidecar serves and what each is given: one set of engines (and its epoch
ticker), one module store, the VM registry, WASI runs, Python evals and snapshots, all sharing one
`Runtime` whose input reader is the server's intake. The CLI and the tests build the daemon here,
so they run the same thing.
"""

from __future__ import annotations

from .engines import Engines
from .evals import PythonEvals
from .limits import Limits
from .modules import ModuleStore
from .runs import WasiRuns
from .runtime import Runtime
from .server import Server, Service
from .snapshot_service import SnapshotService
from .vms import VmService


def build_server(in_fd: int, out_fd: int, limits: Limits, *, handle_signals: bool = False) -> Server:
    server = Server(in_fd, out_fd, limits, handle_signals=handle_signals)
    server.add_services(vm_services)
    return server


def vm_services(server: Server) -> list[Service]:
    """Built once the server's loop runs (its intake, outbox and host calls exist by then). The
    registry comes first: it closes first at shutdown, and stops the engines' ticker last."""
    engines = Engines(server.limits)
    engines.start()
    runtime = Runtime(server.hostcalls, server.intake, server.outbox.send)
    vms = VmService(server.limits, runtime, ModuleStore(server.limits, engines), engines)
    return [vms, WasiRuns(vms.find, runtime), PythonEvals(vms.find),
            SnapshotService(vms, runtime, engines, server.limits)]
