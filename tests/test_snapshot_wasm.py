"""vm.snapshot `format: "wasm"`: a standalone pre-initialized module any runtime can run.

Checked with plain wasmtime (no sidecar): the output instantiates with stub imports, continues
from the snapshotted state, has no start function left to re-run, and stays small for a big
sparse memory. Checked with the sidecar: it loads as an ordinary module and can be snapshotted
again, in both formats.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from sidecar.wasmbin import PREFIX, START_EXPORT, Module
from sidecar.wasmbin.sections import decode

from .guests import call, module_id, refused, rpc
from .snapshot_support import KEEPER, KEEPER_GETTERS, KEEPER_LOADS, SECRET, SPARSE, observe, restore, snapshot
from .support import process_session

pytestmark = pytest.mark.anyio
MiB = 1 << 20


class Plain:
    """One instance of a module in plain wasmtime, `sidecar.*` imports stubbed (and counted)."""

    def __init__(self, wasm: bytes) -> None:
        engine = wasmtime.Engine()
        self.store = wasmtime.Store(engine)
        self.module = wasmtime.Module(engine, wasm)
        self.stub_calls = 0
        linker = wasmtime.Linker(engine)
        for item in self.module.imports:
            assert item.module == "sidecar", item.module
            func_type = item.type
            assert isinstance(func_type, wasmtime.FuncType)
            results = func_type.results

            def stub(*args: Any, _results: list = results) -> Any:
                self.stub_calls += 1
                return 0 if _results else None

            linker.define_func(item.module, item.name or "", func_type, stub)
        self.instance = linker.instantiate(self.store, self.module)

    def __call__(self, export: str, *args: int) -> Any:
        func = self.instance.exports(self.store)[export]
        assert isinstance(func, wasmtime.Func)
        return func(self.store, *args)

    def observe(self) -> dict[str, Any]:
        """What `snapshot_support.observe` reads through the sidecar, read here directly."""
        seen: dict[str, Any] = {name: self(name) for name in KEEPER_GETTERS}
        for name, addresses in KEEPER_LOADS.items():
            for address in addresses:
                seen[f"{name}({address})"] = self(name, address)
        return seen


def structure(wasm: bytes) -> Any:
    return decode(Module.parse(wasm))


async def keeper_snapshot(tmp_path: Path) -> tuple[dict[str, Any], bytes]:
    async def host(vm_id: str, method: str, params: object) -> dict:
        return {}

    async with process_session(host_handler=host) as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": KEEPER}))["vm_id"]
        for n in (4, 5):
            await call(client, vm_id, "step", n)
        await call(client, vm_id, "grow_hidden", 2)
        before = await observe(client, vm_id)
        await snapshot(client, vm_id, tmp_path / "keeper.wasm", "wasm")
    return before, (tmp_path / "keeper.wasm").read_bytes()


async def test_plain_wasmtime_runs_the_output_from_the_snapshotted_state(tmp_path) -> None:
    before, wasm = await keeper_snapshot(tmp_path)
    plain = Plain(wasm)
    assert plain.observe() == before  # hidden memory, hidden globals of every type, memory sizes
    assert plain.stub_calls == 0  # the start function (which calls the host) did not run again
    assert plain("starts") == 1
    assert plain("step", 1) == before["g_i32"] + 1  # and it carries on from there
    assert plain("hidden_load", 4096) == before["hidden_load(4096)"] + 1


async def test_the_output_has_no_start_function_and_keeps_the_instrumentation_exports(tmp_path) -> None:
    _, wasm = await keeper_snapshot(tmp_path)
    module = structure(wasm)
    assert module.start is None
    names = {export.name for export in module.exports}
    assert START_EXPORT not in names
    assert {"__sidecar_memory_0", "__sidecar_memory_1"} <= names  # so it can be snapshotted again
    assert {f"{PREFIX}global_{i}" for i in range(5)} <= names
    # Memory minimums are the snapshot's sizes: a fresh instance has the grown hidden memory.
    assert [limits.minimum for limits in module.memories] == [1, 2]
    assert [limits.maximum for limits in module.memories] == [64, 8]


async def test_a_counter_continues_in_plain_wasmtime(tmp_path) -> None:
    async with process_session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": SECRET}))["vm_id"]
        for _ in range(3):
            await call(client, vm_id, "next")
        await snapshot(client, vm_id, tmp_path / "secret.wasm", "wasm")
    plain = Plain((tmp_path / "secret.wasm").read_bytes())
    assert plain("stored") == 30
    assert plain("next") == 4 and plain("next") == 5
    again = Plain((tmp_path / "secret.wasm").read_bytes())  # every fresh instance starts at the snapshot
    assert again("next") == 4


async def test_the_output_loads_into_the_sidecar_and_snapshots_again(tmp_path) -> None:
    before, wasm = await keeper_snapshot(tmp_path)
    started: list[str] = []

    async def host(vm_id: str, method: str, params: object) -> dict:
        started.append(method)
        return {}

    async with process_session(host_handler=host) as (client, _):
        loaded = await rpc(client, "module.load", {"wasm_base64": base64.b64encode(wasm).decode()})
        assert loaded["module_id"] == module_id(wasm)
        assert not any(e["name"].startswith(PREFIX) for e in loaded["exports"])  # hidden from hosts
        vm_id = (await rpc(client, "vm.create", {"module_id": loaded["module_id"]}))["vm_id"]
        assert await observe(client, vm_id) == before
        await call(client, vm_id, "step", 10)
        moved = await observe(client, vm_id)
        await snapshot(client, vm_id, tmp_path / "again.state")
        await snapshot(client, vm_id, tmp_path / "again.wasm", "wasm")
        from_path = (await rpc(client, "vm.create", {"path": str(tmp_path / "keeper.wasm")}))["vm_id"]
        assert (await call(client, from_path, "g_i32"))["results"] == [before["g_i32"]]
    assert started == []  # no start function in the snapshot, so none ran at vm.create

    async with process_session(host_handler=host) as (client, _):
        vm_id = (await restore(client, tmp_path / "again.state"))["vm_id"]
        assert await observe(client, vm_id) == moved
    assert Plain((tmp_path / "again.wasm").read_bytes()).observe() == moved
    assert started == []


async def test_the_output_of_64_mib_of_zeros_is_small_and_starts_at_full_size(tmp_path) -> None:
    guest = SPARSE.replace("PAGES", "1024")
    async with process_session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": guest}))["vm_id"]
        await call(client, vm_id, "fill")
        await call(client, vm_id, "next")
        answer = await snapshot(client, vm_id, tmp_path / "big.wasm", "wasm")
    assert answer["size_bytes"] < 4096
    plain = Plain((tmp_path / "big.wasm").read_bytes())
    memory = plain.instance.exports(plain.store)["memory"]
    assert isinstance(memory, wasmtime.Memory) and memory.size(plain.store) == 1024
    assert plain("tail") == 0x600DCAFE and plain("head") == 0x0123456789ABCDEF
    assert plain("next") == 2


async def test_a_module_claiming_a_reserved_export_name_runs_but_is_not_snapshotted(session, tmp_path) -> None:
    """`__sidecar_*` exports that are not what the instrumentation would add could make a snapshot
    read the wrong state: such a module runs uninstrumented and its snapshot says why."""
    foreign = """(module
      (global $a (mut i32) (i32.const 1))
      (global $b (export "__sidecar_global_0") (mut i32) (i32.const 2))
      (memory 1)
      (func (export "f") (result i32) (i32.const 3)))"""
    async with session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": foreign}))["vm_id"]
        assert (await call(client, vm_id, "f"))["results"] == [3]
        for format in ("state", "wasm"):
            error = await refused(client, "vm.snapshot",
                                  {"vm_id": vm_id, "path": str(tmp_path / f"x.{format}"), "format": format},
                                  code=-32602)
            assert "__sidecar_global_0" in error.message and error.data["path"] == "$.vm_id"
        assert not list(tmp_path.iterdir())
        assert (await call(client, vm_id, "f"))["results"] == [3]
