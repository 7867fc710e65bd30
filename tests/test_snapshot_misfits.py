"""Snapshot files with a valid checksum that still must not restore: every one is -32006.

`test_snapshot_files` breaks a genuine file in every way the container can be broken, in process.
These cases go further, and through the real process too: an embedded module that compiles but
does not fit this sidecar (a WASI command, imports it cannot satisfy, segments that trap at
instantiation, budgets it exceeds), and a table of hostile files (wasm sections cut short,
mislabelled or lying about their size; bodies cut at every field; values of the wrong type or
range). Each answers -32006 `invalid_snapshot` with a `stage`, never -32603 or another code,
leaves no VM behind, and the sidecar answers `ping` afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import wasmtime

from sidecar import snapshot_file
from sidecar.snapshot_file import SnapshotState
from sidecar.wasmbin import Module as Layout
from sidecar.wasmbin.reader import encode_unsigned

from .guests import call, module_id, refused, rpc
from .snapshot_support import HONEST_STATE, honest_state, replace, restore, sealed, write_state

pytestmark = pytest.mark.anyio
PAGE = 65536
STATE = HONEST_STATE  # what every module below declares, so the honest state fits it
FITS = f'(module {STATE} (func (export "get") (result i32) (i32.const 5)))'
MODULE_BYTES = 4096  # the restoring sidecar's runner_module_bytes
ENV = {"SIDECAR_RUNNER_MODULE_BYTES": str(MODULE_BYTES), "SIDECAR_VM_TABLE_ELEMENTS": "1000"}


def _wasm(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def _padded(wasm: bytes, size: int) -> bytes:
    """`wasm` with a custom section that makes it `size` bytes or more: same meaning, more bytes."""
    payload = b"\x03pad" + bytes(size)
    return wasm + b"\x00" + encode_unsigned(len(payload)) + payload




# Modules that compile and carry state the file describes honestly, but that this sidecar cannot
# host: case -> (module, the stages it may be refused at, data it must name)
MISFITS: dict[str, tuple[bytes, set[str], dict[str, Any]]] = {
    "wasi-command": (_wasm(f'(module (import "wasi_snapshot_preview1" "proc_exit" (func (param i32))) {STATE}'
                           ' (func (export "_start")))'), {"module"}, {}),
    "foreign-import": (_wasm(f'(module (import "env" "f" (func)) {STATE})'), {"module"}, {}),
    "unknown-wasi-function": (_wasm(f'(module (import "wasi_snapshot_preview1" "no_such_call" (func)) {STATE})'),
                              {"module"}, {}),
    "wasi-wrong-signature": (
        _wasm(f'(module (import "wasi_snapshot_preview1" "proc_exit" (func (param i64))) {STATE})'), {"module"}, {}),
    "abi-wrong-signature": (_wasm(f'(module (import "sidecar" "input_len" (func (result i64))) {STATE})'),
                            {"module"}, {}),
    "data-out-of-bounds": (_wasm(f'(module {STATE} (data (i32.const 70000) "x"))'), {"module"}, {}),
    "elem-out-of-bounds": (_wasm(f'(module {STATE} (table 1 funcref) (func $f) (elem (i32.const 5) $f))'),
                           {"module"}, {}),
    "table-over-budget": (_wasm(f'(module {STATE} (table 100000 funcref))'), {"module", "bounds"}, {}),
    "memory-minimum-over-budget": (
        _wasm('(module (memory (export "memory") 40000 65536) (global (mut i32) (i32.const 0))'
              ' (global (mut i64) (i64.const 0)))'), {"bounds"}, {"limit": "vm_memory_bytes"}),
    "module-over-runner-module-bytes": (_padded(_wasm(FITS), MODULE_BYTES), {"bounds"},
                                        {"limit": "runner_module_bytes", "capacity": MODULE_BYTES}),
    "foreign-reserved-export": (_wasm(f'(module {STATE} (func (export "__sidecar_memory_7")))'), {"module"}, {}),
}


async def test_the_honest_control_restores(session, tmp_path) -> None:
    """The state every misfit is built like restores when its module fits: the refusals below
    are about the modules, not about the way the files are made."""
    async with session(env=ENV) as (client, _):
        vm_id = (await restore(client, write_state(tmp_path / "fits.state", honest_state(_wasm(FITS)))))["vm_id"]
        assert (await call(client, vm_id, "get"))["results"] == [5]


async def test_an_embedded_module_that_does_not_fit_is_an_invalid_snapshot(session, tmp_path) -> None:
    async with session(env=ENV) as (client, _):
        for case, (wasm, stages, named) in MISFITS.items():
            path = write_state(tmp_path / f"{case}.state", honest_state(wasm))
            error = await refused(client, "vm.restore", {"path": str(path)}, code=-32006)
            assert error.data["stage"] in stages, (case, error.message, error.data)
            assert named.items() <= error.data.items(), (case, error.data)
            assert (await rpc(client, "vm.list"))["vms"] == [], case
        stats = await rpc(client, "sidecar.stats")
        assert stats["vms"] == 0 and stats["host_calls_pending"] == 0
        assert await rpc(client, "ping") == {}


# -- a table of hostile files --------------------------------------------------------------------


def _with_module(wasm: bytes) -> bytes:
    """The control state around another module, under that module's own id: only the wasm lies."""
    return snapshot_file.encode(replace(honest_state(_wasm(FITS)), module=wasm, module_id=module_id(wasm)))


def _section_cases() -> dict[str, bytes]:
    """Each section of the control module cut short, renamed to an id that does not exist, and
    claiming one byte more than it holds."""
    wasm = _wasm(FITS)
    cases = {}
    for number, section in enumerate(Layout.parse(wasm).sections):
        header = section.start - section.size_width - 1
        cases[f"section{number}-cut"] = _with_module(wasm[: section.start + (section.end - section.start) // 2])
        cases[f"section{number}-unknown-id"] = _with_module(wasm[:header] + b"\x7f" + wasm[header + 1 :])
        longer = encode_unsigned(section.end - section.start + 1)
        if len(longer) == section.size_width:
            cases[f"section{number}-size-lies"] = _with_module(
                wasm[: header + 1] + longer + wasm[section.start :])
    return cases


def _field_cuts() -> dict[str, bytes]:
    """The body cut before and inside each of its fields, re-wrapped with a valid checksum."""
    body = msgspec.msgpack.encode(honest_state(_wasm(FITS)))
    cases = {}
    for name in SnapshotState.__struct_fields__:
        at = body.index(msgspec.msgpack.encode(name))
        cases[f"body-cut-before-{name}"] = sealed(body[:at])
        cases[f"body-cut-in-{name}"] = sealed(body[: at + len(name) + 1])  # its key read, its value not
    return cases


def _lie(**fields: Any) -> bytes:
    """The control body with fields replaced by values of any type, re-wrapped with a valid checksum."""
    plain = msgspec.to_builtins(honest_state(_wasm(FITS)))
    plain["module"] = _wasm(FITS)
    return sealed(msgspec.msgpack.encode({**plain, **fields}))


_MEMORY = {"index": 0, "size_bytes": PAGE, "runs": []}
TYPE_LIES: dict[str, Callable[[], bytes]] = {
    "module-as-text": lambda: _lie(module="(module)"),
    "memory-index-negative": lambda: _lie(memories=[{**_MEMORY, "index": -1}]),
    "memory-size-text": lambda: _lie(memories=[{**_MEMORY, "size_bytes": "64 KiB"}]),
    "memory-run-without-bytes": lambda: _lie(memories=[{**_MEMORY, "runs": [[0]]}]),
    "memory-run-negative": lambda: _lie(memories=[{**_MEMORY, "runs": [[-8, b"x"]]}]),
    "global-v128": lambda: _lie(globals=[{"index": 0, "valtype": "v128", "value": 0}]),
    "global-value-text": lambda: _lie(globals=[{"index": 0, "valtype": "i32", "value": "0"}]),
    "limits-not-numbers": lambda: _lie(limits={"vm_fuel": "lots"}),
    "pending-id-number": lambda: _lie(pending_host_calls=[{"id": 5, "ticket": 0, "method": "m", "params": b"1"}],
                                      next_ticket=1),
    "next-ticket-negative": lambda: _lie(next_ticket=-1),
    # Tickets reach the guest as i64: one past that range would fault the host function that issues it.
    "next-ticket-past-i64": lambda: _lie(next_ticket=2**63),
    "pending-ticket-past-i64": lambda: _lie(
        pending_host_calls=[{"id": "feed.1", "ticket": 2**63, "method": "m", "params": b"1"}], next_ticket=2**64 - 1),
    "mode-unknown": lambda: _lie(mode="frozen"),
}


def hostile_files() -> dict[str, bytes]:
    return {**_section_cases(), **_field_cuts(), **{case: make() for case, make in TYPE_LIES.items()}}


async def test_every_hostile_file_in_the_table_is_an_invalid_snapshot(session, tmp_path) -> None:
    files = hostile_files()
    assert len(files) > 40  # the table was built: every section, every field, every lie
    async with session(env=ENV) as (client, _):
        for case, blob in files.items():
            path = tmp_path / f"{case}.state"
            path.write_bytes(blob)
            error = await refused(client, "vm.restore", {"path": str(path)}, code=-32006)
            assert error.data.get("stage") in {"format", "module", "bounds"}, (case, error.message, error.data)
        assert (await rpc(client, "vm.list"))["vms"] == []
        assert await rpc(client, "ping") == {}
