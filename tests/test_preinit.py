"""Pre-initialization (contract v1.1): `preinit` on `module.load` and `vm.create`, end to end.

An export runs once and the state it leaves is baked into a module: every instance of it starts
there (stateful, stateless and a stateless VM's replacements), the start function does not run
again, and the bake is cached under the source, the spec and the engine, in this process and on
disk, so a second load (in a new process too) does not run the export. The refusals are in
`test_preinit_refusals`.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import anyio
import pytest

from .guests import call, module_id, output_bytes, rpc, vm_info, wasm, wat
from .snapshot_support import read_state, restore, snapshot
from .support import process_session

# Whether a bake is cached is what these tests see: each starts with an empty cache.
pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("own_compile_cache")]
GUEST = wat("preinit", PAGES=4)


def preinit(export: str = "init", **spec: Any) -> dict[str, Any]:
    return {"export": export, **spec}


def seeded(tmp_path: Path, text: str) -> dict[str, Any]:
    """A preinit of the WASI guest whose `init` reads `text` from a preopened directory."""
    directory = tmp_path / "seed"
    directory.mkdir(exist_ok=True)
    (directory / "seed.txt").write_text(text)
    return preinit(wasi={"preopens": [{"host_path": str(directory), "guest_path": "/seed"}]})


async def baked_state(client: Any, vm_id: str) -> dict[str, Any]:
    """What `init` of the `preinit` guest set, as a VM of its baked module sees it."""
    seen = {name: (await call(client, vm_id, name))["results"][0] for name in ("wide", "ratio", "starts", "pages")}
    for address in (1024, 196604):
        seen[address] = (await call(client, vm_id, "load", address))["results"][0]
    return seen


INITIALIZED = {"wide": -5, "ratio": 0.1, "starts": 1, "pages": 3, 1024: 1234, 196604: 777}


async def test_a_baked_module_starts_every_vm_in_the_state_its_export_left(session) -> None:
    async with session() as (client, _):
        plain = await rpc(client, "module.load", {"wat": GUEST})
        loaded = await rpc(client, "module.load", {"wat": GUEST, "preinit": preinit()})
        assert loaded["module_id"] != plain["module_id"] == module_id(wasm("preinit", PAGES=4))
        assert loaded["preinit_cached"] is False and loaded["cached"] is False
        assert loaded["preinit_ms"] > 0 and loaded["compile_ms"] > 0
        assert loaded["exports"] == plain["exports"] and loaded["imports"] == plain["imports"]
        assert "preinit_ms" not in plain and "preinit_cached" not in plain

        vm_id = (await rpc(client, "vm.create", {"module_id": loaded["module_id"]}))["vm_id"]
        assert await baked_state(client, vm_id) == INITIALIZED  # the start function ran once, in the bake
        assert [(await call(client, vm_id, "bump"))["results"][0] for _ in range(2)] == [42, 43]

        # vm.create pre-initializes too, and names the module its VM runs: the same bake, found again.
        created = await rpc(client, "vm.create", {"wat": GUEST, "preinit": preinit()})
        assert created["module_id"] == loaded["module_id"] and created["preinit_cached"] is True
        assert (await call(client, created["vm_id"], "bump"))["results"] == [42]
        assert (await vm_info(client, created["vm_id"]))["module_id"] == loaded["module_id"]
        plain_vm = await rpc(client, "vm.create", {"module_id": plain["module_id"]})
        assert set(plain_vm) == {"vm_id"}  # no preinit: the v1 result
        assert (await call(client, plain_vm["vm_id"], "bump"))["results"] == [1]


async def test_every_stateless_instance_and_replacement_starts_initialized(session) -> None:
    async with session() as (client, _):
        created = await rpc(client, "vm.create", {"wat": GUEST, "preinit": preinit("init_ok"), "mode": "stateless",
                                                  "limits": {"vm_recycle_after_calls": 1}})
        vm_id = created["vm_id"]
        assert [(await call(client, vm_id, "bump"))["results"][0] for _ in range(8)] == [42] * 8
        assert (await vm_info(client, vm_id))["recycles"]["calls"] == 8  # eight fresh instances, each initialized
        assert await baked_state(client, vm_id) == INITIALIZED


async def test_identical_concurrent_preinits_run_the_export_once(session) -> None:
    async with session() as (client, _):
        results: list[dict[str, Any]] = []

        async def load() -> None:
            results.append(await rpc(client, "module.load", {"wat": GUEST, "preinit": preinit()}))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(load)
    assert sorted(result["preinit_cached"] for result in results) == [False, True, True]
    assert len({result["module_id"] for result in results}) == 1


async def test_a_wasi_guest_keeps_what_it_read_from_a_preopen(session, tmp_path) -> None:
    async with session() as (client, _):
        created = await rpc(client, "vm.create", {"wat": wat("preinit_wasi"), "preinit": seeded(tmp_path, "abc")})
        # The VM itself sees no directory: what it shows was read during pre-initialization.
        assert output_bytes(await call(client, created["vm_id"], "show")) == b"abc"


async def test_the_bake_is_cached_across_processes_and_the_export_not_run_again(tmp_path) -> None:
    """The seed file changes between the processes: the second one still sees the first bake,
    since the cache names a preopen by its path (the spec), not by the files in it."""
    params = {"wat": wat("preinit_wasi"), "preinit": seeded(tmp_path, "first")}
    async with process_session() as (client, _):
        first = await rpc(client, "module.load", params)
        again = await rpc(client, "module.load", params)
        vm_id = (await rpc(client, "vm.create", {"module_id": first["module_id"]}))["vm_id"]
        assert output_bytes(await call(client, vm_id, "show")) == b"first"
    assert first["preinit_cached"] is False and again["preinit_cached"] is True
    assert again["module_id"] == first["module_id"]

    seeded(tmp_path, "second")
    async with process_session() as (client, _):
        later = await rpc(client, "module.load", params)
        assert later["preinit_cached"] is True and later["cached"] is True and later["preinit_ms"] == 0
        assert later["module_id"] == first["module_id"]
        vm_id = (await rpc(client, "vm.create", {"module_id": later["module_id"]}))["vm_id"]
        assert output_bytes(await call(client, vm_id, "show")) == b"first"
        # Another spec is another bake: this one runs, and reads the file as it is now.
        other = dict(params, preinit={**params["preinit"], "wasi": {**params["preinit"]["wasi"], "args": ["v2"]}})
        fresh = await rpc(client, "vm.create", other)
        assert fresh["preinit_cached"] is False
        assert output_bytes(await call(client, fresh["vm_id"], "show")) == b"second"


async def test_a_baked_module_met_again_in_a_fresh_process_is_not_compiled_again(tmp_path) -> None:
    """A snapshot embeds the baked module; restoring it in a fresh process loads those bytes, which
    the bake left in the compile cache under their own load key too."""
    path = tmp_path / "baked.state"
    async with process_session() as (client, _):
        baked = await rpc(client, "module.load", {"wat": wat("preinit_wasi"), "preinit": seeded(tmp_path, "x")})
        vm_id = (await rpc(client, "vm.create", {"module_id": baked["module_id"]}))["vm_id"]
        await rpc(client, "vm.snapshot", {"vm_id": vm_id, "path": str(path)})
    embedded = read_state(path).module
    assert module_id(embedded) == baked["module_id"]
    async with process_session() as (client, _):
        loaded = await rpc(client, "module.load", {"wasm_base64": base64.b64encode(embedded).decode()})
        assert loaded["cached"] is True and loaded["module_id"] == baked["module_id"]


async def test_a_corrupt_cache_entry_is_baked_again(tmp_path) -> None:
    params = {"wat": GUEST, "preinit": preinit()}
    async with process_session() as (client, _):
        first = await rpc(client, "module.load", params)
    for entry in (tmp_path / "compile-cache").glob("*.cwasm"):
        data = bytearray(entry.read_bytes())
        data[len(data) // 2] ^= 0xFF
        entry.write_bytes(bytes(data))
    async with process_session() as (client, _):
        again = await rpc(client, "module.load", params)
        assert again["preinit_cached"] is False and again["module_id"] == first["module_id"]
        vm_id = (await rpc(client, "vm.create", {"module_id": again["module_id"]}))["vm_id"]
        assert (await call(client, vm_id, "bump"))["results"] == [42]


async def test_a_vm_of_a_baked_module_snapshots_and_restores(session, tmp_path) -> None:
    async with session() as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": GUEST, "preinit": preinit()}))["vm_id"]
        assert (await call(client, vm_id, "bump"))["results"] == [42]
        await snapshot(client, vm_id, tmp_path / "vm.state")
        await snapshot(client, vm_id, tmp_path / "vm.wasm", "wasm")
        restored = (await restore(client, tmp_path / "vm.state"))["vm_id"]
        assert (await call(client, restored, "bump"))["results"] == [43]
        assert await baked_state(client, restored) == INITIALIZED
        # Its wasm snapshot is a module like a baked one, and can be pre-initialized once more.
        source = {"wasm_base64": base64.b64encode((tmp_path / "vm.wasm").read_bytes()).decode()}
        resumed = await rpc(client, "vm.create", source)
        assert (await call(client, resumed["vm_id"], "bump"))["results"] == [43]
        again = await rpc(client, "vm.create", {**source, "preinit": preinit()})
        assert (await call(client, again["vm_id"], "bump"))["results"] == [42]
        assert await baked_state(client, again["vm_id"]) == {**INITIALIZED, "pages": 5}


async def test_host_calls_in_the_export_are_refused_and_never_reach_the_host(session) -> None:
    asked: list[str] = []

    async def host(vm_id: str, method: str, params: Any) -> Any:
        asked.append(method)
        return {}

    async with session(host_handler=host) as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": GUEST, "preinit": preinit("init_asks")}))["vm_id"]
        statuses = [(await call(client, vm_id, "load", address))["results"][0] for address in (2048, 2052)]
    assert statuses == [-3, -3] and asked == []


async def test_the_run_is_not_metered_by_the_vms_fuel(session) -> None:
    """Fuel is a guest call's budget: the runner's run is bounded by its time limit instead."""
    async with session() as (client, _):
        created = await rpc(client, "vm.create", {"wat": GUEST, "preinit": preinit("init_burns"),
                                                  "limits": {"vm_fuel": 10_000}})
        called = await call(client, created["vm_id"], "bump")
    assert called["results"] == [42] and 0 < called["fuel_used"] <= 10_000
