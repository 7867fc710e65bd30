"""What must hold before a VM exists: a module the sidecar can host within the VM's budgets, and
a WASI view whose directories are there.

Owns the checks that turn what wasmtime would refuse late and vaguely (an unresolvable import, a
store limit at instantiation: a generic trap) into precise errors before any store is made: the
import contract (`wasi_snapshot_preview1`, and `sidecar` with guest ABI v1's signatures), declared
memories and tables against the store limits, and preopens; and the `runner_vms` slot that a VM
being built holds from its first step (`Starting`, handed out by the registry). Knows nothing about
how VMs run.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import wasmtime

from protocol.errors import InvalidModuleError, InvalidParamsError
from protocol.methods import WasiSettings

from . import guest_abi
from .limits import Limits
from .modules import WASI_MODULE, CompiledModule

# The budgets each module last passed the checks against: a module's imports and declarations do
# not change, and most VMs have the registry's own budgets, so a vm.create from a loaded module
# skips the ~4 µs of checks it would repeat.
_PASSED: weakref.WeakKeyDictionary[wasmtime.Module, Limits] = weakref.WeakKeyDictionary()


def check_module(compiled: CompiledModule, limits: Limits) -> None:
    if _PASSED.get(compiled.module) is limits:
        return
    check_imports(compiled)
    check_declared(compiled, limits)
    _PASSED[compiled.module] = limits


def check_imports(compiled: CompiledModule) -> None:
    """Refuse, naming it, any import the sidecar does not provide with that signature."""
    for item in compiled.imports:
        if item.module == WASI_MODULE:
            continue
        expected = guest_abi.SIGNATURES.get(item.name) if item.module == guest_abi.MODULE else None
        if expected is None or item.kind != "func":
            raise InvalidModuleError(
                f"the module imports {item.module}.{item.name}, which the sidecar does not provide",
                stage="imports",
                module=item.module,
                name=item.name,
            )
        if (tuple(item.params or ()), tuple(item.results or ())) != expected:
            raise InvalidModuleError(
                f"{item.module}.{item.name} is imported with the wrong signature",
                stage="imports",
                module=item.module,
                name=item.name,
                expected={"params": list(expected[0]), "results": list(expected[1])},
            )


def check_declared(compiled: CompiledModule, limits: Limits) -> None:
    """Refuse, naming the limit, a module whose declared memories or tables exceed a store limit:
    wasmtime refuses those at instantiation with a generic error. `vm_instances` needs no check:
    every store instantiates exactly one module."""
    memories, tables = compiled.memory_minimums, compiled.table_minimums
    for name, observed in (
        ("vm_memory_bytes", max(memories, default=0)),
        ("vm_memories", len(memories)),
        ("vm_tables", len(tables)),
        ("vm_table_elements", max(tables, default=0)),
    ):
        if observed > getattr(limits, name):
            raise limits.exceeded(name, observed, module_id=compiled.module_id)


def check_preopens(wasi: WasiSettings, path: str = "$.wasi") -> None:
    """`path` is where the view is in the request (a preinit's has its own)."""
    for index, preopen in enumerate(wasi.preopens):
        if not os.path.isdir(preopen.host_path):
            raise InvalidParamsError(
                f"preopen {preopen.host_path!r} is not a directory", path=f"{path}.preopens[{index}].host_path"
            )


class Starting:
    """A `runner_vms` slot held by a VM being built; `held` until the VM is live. A context manager
    that gives the slot back unless the VM went live: a class, as a generator's costs ~1.6 µs more."""

    __slots__ = ("held", "_end")

    def __init__(self, end: Callable[[Starting], None]) -> None:
        self.held = True
        self._end = end

    def __enter__(self) -> Starting:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._end(self)
