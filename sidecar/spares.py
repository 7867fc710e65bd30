"""Instances made ahead: one spare instance per module, for the next VM made of it.

Owns the spares: which VMs may start from one, making one after the answer that used the last,
and closing them. A VM's first instance (a store, its budgets, an instantiation) is half of a
`vm.create` from a loaded module (~35 of ~50 µs through the registry, measured with
`benchmarks/bench_path_parts.py`); a spare made once the previous answer has left takes it off
the next request's path. Knows nothing of requests or the registry: `sidecar.vms` asks.

What makes a spare indistinguishable from an instance made for its VM:
- it is what any VM with the registry's own budgets starts with: the process's limits (a VM that
  tightens any gets its own instance), the plain WASI view (no args, env or preopens), a store of
  the module's own engine;
- no guest code has run in it: a module with a start function (ours, `__sidecar_start`, or one
  left in place) is never spared, since its start function may call the host, which needs a VM;
- adopting it (`Isolate.adopt`) gives it the VM's id and async-call queue before any call.

Thread safety: `take` and `refill` may run on any thread; the table is touched under one lock, and
a spare is built outside it (two threads may build one for the same module: the second is closed).
At most `runner_spare_instances` modules keep one (the least recently refilled goes first); each is
a live store, so it reserves address space like a VM's (see `runner_vms`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import structlog
import wasmtime

from protocol.errors import RpcError
from protocol.methods import WasiSettings

from .hostcalls import STATUS_REFUSED
from .isolate import Isolate, starts_with_guest_code
from .limits import Limits
from .modules import CompiledModule
from .runtime import Runtime
from .wasi_view import wasi_config

log = structlog.get_logger()
_PLAIN_VIEW = WasiSettings()
_UNADOPTED = ""  # a spare's vm_id until a VM adopts it; no guest code runs before then


class Spares:
    def __init__(self, limits: Limits, runtime: Runtime) -> None:
        self._limits = limits
        self._runtime = runtime
        self._spares: OrderedDict[wasmtime.Module, Isolate] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        return len(self._spares)

    def take(self, compiled: CompiledModule, limits: Limits, wasi: WasiSettings) -> Isolate | None:
        """The spare for a new VM of `compiled` with these budgets and WASI view, if one fits; the
        caller adopts it (`Isolate.adopt`) before anything else."""
        if limits is not self._limits or wasi != _PLAIN_VIEW:
            return None
        with self._lock:
            return self._spares.pop(compiled.module, None)

    def refill(self, compiled: CompiledModule, limits: Limits, wasi: WasiSettings) -> None:
        """Make `compiled`'s spare if a VM like this one may start from it and it has none: after
        the answer that needed it has left (a store and an instantiation, as a `vm.create` costs)."""
        if not self._limits.runner_spare_instances or limits is not self._limits or wasi != _PLAIN_VIEW:
            return
        with self._lock:
            if self._closed or compiled.module in self._spares:
                return
        try:
            if compiled.command or starts_with_guest_code(compiled):
                return
            spare = Isolate(_UNADOPTED, compiled, limits, self._runtime, _refuse_async,
                            wasi_config(wasi) if compiled.wasi else None)
        except RpcError as exc:  # the VM that asks for it will say why, to its host
            log.debug("spare_failed", module_id=compiled.module_id, error=exc.message)
            return
        with self._lock:
            extra = spare if self._closed or compiled.module in self._spares else None
            if extra is None:
                self._spares[compiled.module] = spare
                if len(self._spares) > self._limits.runner_spare_instances:  # one over at most
                    extra = self._spares.popitem(last=False)[1]
        if extra is not None:
            extra.close()

    def forget_engine(self, engine: wasmtime.Engine) -> None:
        """`Engines` dropped `engine`: its modules' spares go with it."""
        with self._lock:
            gone = [module for module, spare in self._spares.items() if spare.compiled.engine is engine]
            spares = [self._spares.pop(module) for module in gone]
        for spare in spares:
            spare.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spares = list(self._spares.values())
            self._spares.clear()
        for spare in spares:
            spare.close()


def _refuse_async(method: str, params: bytes) -> int:
    """A spare's async host calls before adoption: none can happen (no guest code runs in it)."""
    return STATUS_REFUSED
