"""A real compiled guest across snapshots: the C key/value store in `tests/guests/c/`.

Its state is where C keeps it: entries on the malloc heap, counters in C globals, and clang's
`__stack_pointer`, an internal mutable wasm global that only the instrumentation can reach. The
committed `kv.wasm` is checked against its sources (exports, imports, behaviour under a small
fake of the guest ABI in plain wasmtime), so CI needs no clang; `build.sh` rebuilds it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from sidecar.wasmbin import Module, instrument
from sidecar.wasmbin.sections import decode

from .guests import call, output_bytes, rpc
from .snapshot_support import (
    KV_DIR,
    ManualHost,
    answer,
    kv_source,
    kv_wasm,
    read_state,
    replace,
    restore,
    snapshot,
    until_result,
    write_state,
)
from .support import process_session

pytestmark = pytest.mark.anyio
ENTRIES = {"user:1": "Ada", "user:2": "Grace", "config": '{"depth": 3}', "empty": ""}


def stack_pointer_initializer(wasm: bytes) -> int:
    """The constant clang gives `__stack_pointer` (global 0): `i32.const N end`."""
    init = decode(Module.parse(wasm)).globals[0].init
    assert init[0] == 0x41 and init[-1] == 0x0B
    value, shift = 0, 0
    for byte in init[1:-1]:  # signed LEB128
        value |= (byte & 0x7F) << shift
        shift += 7
    return value - (1 << shift) if init[-2] & 0x40 else value


class FakeAbi:
    """Just enough of the guest ABI, in plain wasmtime, to drive kv.wasm without the sidecar."""

    def __init__(self, wasm: bytes) -> None:
        engine = wasmtime.Engine()
        self.store = wasmtime.Store(engine)
        module = wasmtime.Module(engine, wasm)
        self.input, self.output, self.sent = b"", b"", []
        linker = wasmtime.Linker(engine)
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        functions = {
            "input_len": (wasmtime.FuncType([], [i32]), lambda: len(self.input)),
            "input_read": (wasmtime.FuncType([i32], []), lambda p: self._write(p, self.input)),
            "output_write": (wasmtime.FuncType([i32, i32], []), self._output),
            "host_call_async": (wasmtime.FuncType([i32, i32, i32, i32], [i64]), self._async),
            "response_read": (wasmtime.FuncType([i32], []), lambda p: self._write(p, self.response)),
        }
        for name, (func_type, function) in functions.items():
            linker.define_func("sidecar", name, func_type, function)
        self.instance = linker.instantiate(self.store, module)
        self.response = b""

    def memory(self) -> wasmtime.Memory:
        memory = self.instance.exports(self.store)["memory"]
        assert isinstance(memory, wasmtime.Memory)
        return memory

    def _write(self, pointer: int, data: bytes) -> None:
        self.memory().write(self.store, data, pointer)

    def _output(self, pointer: int, length: int) -> None:
        self.output += self.memory().read(self.store, pointer, pointer + length)

    def _async(self, method_ptr: int, method_len: int, params_ptr: int, params_len: int) -> int:
        memory = self.memory()
        method = memory.read(self.store, method_ptr, method_ptr + method_len).decode()
        self.sent.append((method, json.loads(memory.read(self.store, params_ptr, params_ptr + params_len))))
        return len(self.sent) - 1

    def __call__(self, export: str, *args: int, input: str = "") -> Any:
        self.input, self.output = input.encode(), b""
        func = self.instance.exports(self.store)[export]
        assert isinstance(func, wasmtime.Func)
        return func(self.store, *args)

    def deliver(self, ticket: int, status: int, payload: bytes) -> None:
        self.response = payload
        self("sidecar_on_response", ticket, status, len(payload))


def test_the_committed_binary_exports_and_imports_what_its_sources_declare() -> None:
    source = (KV_DIR / "kv.c").read_text()
    declared = set(re.findall(r'SIDECAR_EXPORT\("(\w+)"\)', source))
    header = (KV_DIR / "sidecar.h").read_text()
    imports = dict(re.findall(r'SIDECAR_IMPORT\("(\w+)"\)\s+\w+\s+(\w+)\(', header))
    assert len(imports) == 6  # the whole guest ABI v1
    used = {name for name, function in imports.items() if re.search(rf"\b{function}\(", source)}
    module = wasmtime.Module(wasmtime.Engine(), kv_wasm())
    assert {e.name for e in module.exports} == declared | {"memory"}
    assert {(i.module, i.name) for i in module.imports} == {("sidecar", name) for name in used}
    info = instrument(kv_wasm())
    assert info.snapshottable and info.start_export is None
    assert [g.valtype for g in info.globals] == ["i32"]  # __stack_pointer, internal and mutable


def test_the_committed_binary_behaves_as_its_sources_say() -> None:
    check_behaviour(kv_wasm())


def clang_for_wasm() -> bool:
    return shutil.which("clang") is not None and Path("/usr/lib/wasm32-wasi/libc.a").exists()


@pytest.mark.skipif(not clang_for_wasm(), reason="needs clang, lld and wasi-libc (see tests/guests/c/build.sh)")
def test_build_sh_rebuilds_a_binary_that_behaves_the_same(tmp_path) -> None:
    """Not byte for byte (another clang may lay it out differently): the same exports and behaviour."""
    out = tmp_path / "kv.wasm"
    subprocess.run(["sh", str(KV_DIR / "build.sh"), str(out)], check=True, capture_output=True, timeout=120)
    engine = wasmtime.Engine()
    exports = {e.name for e in wasmtime.Module(engine, out.read_bytes()).exports}
    assert exports == {e.name for e in wasmtime.Module(engine, kv_wasm()).exports}
    check_behaviour(out.read_bytes())


def check_behaviour(wasm: bytes) -> None:
    kv = FakeAbi(wasm)
    assert kv("size") == 0 and kv("bump") == 1 and kv("bump") == 2
    for n, (key, value) in enumerate(ENTRIES.items(), 1):
        assert kv("put", input=f"{key}={value}") == n
    assert kv("put", input="user:1=Lovelace") == len(ENTRIES)  # replaced, not added
    assert kv("get", input="user:1") == 8 and kv.output == b"Lovelace"
    assert kv("get", input="config") == 12 and kv.output == b'{"depth": 3}'
    assert kv("get", input="missing") == -1 and kv.output == b""
    assert kv("heap_bytes") == sum(len(k) + len(v) for k, v in ENTRIES.items()) + len("Lovelace") - len("Ada")
    assert kv("fetch", input="user:9") == 0 and kv("pending") == 1
    assert kv.sent == [("kv.fetch", {"key": "user:9"})]
    kv.deliver(0, 0, b'{"name":"Eve"}')
    assert kv("pending") == 0 and kv("responses") == 1 and kv("last_status") == 0 and kv("last_ticket") == 0
    assert kv("get", input="user:9") == 14 and kv.output == b'{"name":"Eve"}'
    assert kv("stack_top") < stack_pointer_initializer(wasm)


async def fill(client, vm_id: str) -> dict[str, Any]:
    """Entries with churn on the heap (a replaced value is freed), and a view of it all."""
    for key, value in ENTRIES.items():
        await call(client, vm_id, "put", input=f"{key}={value}")
    await call(client, vm_id, "put", input="user:1=Lovelace")
    for _ in range(3):
        await call(client, vm_id, "bump")
    return await view(client, vm_id)


async def view(client, vm_id: str) -> dict[str, Any]:
    seen = {name: (await call(client, vm_id, name))["results"][0]
            for name in ("size", "checksum", "heap_bytes", "responses", "pending", "stack_top")}
    for key in (*ENTRIES, "user:9"):
        seen[key] = output_bytes(await call(client, vm_id, "get", input=key))
    return seen


async def test_heap_and_globals_survive_restores_across_three_processes(tmp_path) -> None:
    async with process_session() as (client, _):
        vm_id = (await rpc(client, "vm.create", kv_source()))["vm_id"]
        first = await fill(client, vm_id)
        await snapshot(client, vm_id, tmp_path / "one.state")
    assert first["size"] == 4 and first["user:1"] == b"Lovelace"

    async with process_session() as (client, _):
        vm_id = (await restore(client, tmp_path / "one.state"))["vm_id"]
        assert await view(client, vm_id) == first
        assert (await call(client, vm_id, "bump"))["results"] == [4]
        await call(client, vm_id, "put", input="user:9=" + "x" * 3000)  # a bigger allocation
        await call(client, vm_id, "put", input="user:2=Hopper")
        second = await view(client, vm_id)
        await snapshot(client, vm_id, tmp_path / "two.state")
    assert second["size"] == 5 and second["checksum"] != first["checksum"]

    async with process_session() as (client, _):
        vm_id = (await restore(client, tmp_path / "two.state"))["vm_id"]
        assert await view(client, vm_id) == second
        assert (await call(client, vm_id, "bump"))["results"] == [5]


async def test_the_stack_pointer_global_is_captured_and_restored(tmp_path) -> None:
    initial = stack_pointer_initializer(kv_wasm())
    async with process_session() as (client, _):
        vm_id = (await rpc(client, "vm.create", kv_source()))["vm_id"]
        await fill(client, vm_id)
        top = (await call(client, vm_id, "stack_top"))["results"][0]
        await snapshot(client, vm_id, tmp_path / "kv.state")
        await snapshot(client, vm_id, tmp_path / "kv.wasm", "wasm")
    state = read_state(tmp_path / "kv.state")
    [stack_pointer] = state.globals
    assert (stack_pointer.index, stack_pointer.valtype, stack_pointer.value) == (0, "i32", initial)
    assert stack_pointer_initializer((tmp_path / "kv.wasm").read_bytes()) == initial

    # The restored value is the file's, not the module's initializer: move the stack down a page.
    moved = replace(state, globals=[replace(stack_pointer, value=initial - 4096)])
    write_state(tmp_path / "moved.state", moved)
    async with process_session() as (client, _):
        vm_id = (await restore(client, tmp_path / "moved.state"))["vm_id"]
        assert (await call(client, vm_id, "stack_top"))["results"] == [top - 4096]
        assert output_bytes(await call(client, vm_id, "get", input="user:1")) == b"Lovelace"


async def test_a_pending_fetch_is_answered_after_a_restore_in_a_new_process(tmp_path) -> None:
    async with process_session() as (client, _):
        host = ManualHost(client)
        vm_id = (await rpc(client, "vm.create", kv_source()))["vm_id"]
        await fill(client, vm_id)
        assert (await call(client, vm_id, "fetch", input="user:9"))["results"] == [0]
        assert (await call(client, vm_id, "fetch", input="config"))["results"] == [1]
        sent = [await host.next(), await host.next()]
        await snapshot(client, vm_id, tmp_path / "fetching.state")

    async with process_session() as (client, _):
        restored = await restore(client, tmp_path / "fetching.state")
        vm_id = restored["vm_id"]
        assert restored["pending_host_calls"] == [
            {"id": sent[0]["id"], "method": "kv.fetch", "params": {"key": "user:9"}},
            {"id": sent[1]["id"], "method": "kv.fetch", "params": {"key": "config"}},
        ]
        assert (await call(client, vm_id, "pending"))["results"] == [2]
        await answer(client, sent[1]["id"], {"depth": 4})
        await answer(client, sent[0]["id"], error={"code": 404, "message": "no user:9"})
        await until_result(client, vm_id, "responses", 2)
        assert (await call(client, vm_id, "pending"))["results"] == [0]
        assert (await call(client, vm_id, "last_status"))["results"] == [-1]
        assert (await call(client, vm_id, "last_ticket"))["results"] == [0]
        assert output_bytes(await call(client, vm_id, "get", input="config")) == b'{"depth":4}'
        assert json.loads(output_bytes(await call(client, vm_id, "get", input="user:9"))) == {
            "code": 404, "message": "no user:9"}


async def test_the_wasm_format_runs_the_store_in_plain_wasmtime(tmp_path) -> None:
    async with process_session() as (client, _):
        vm_id = (await rpc(client, "vm.create", kv_source()))["vm_id"]
        before = await fill(client, vm_id)
        await snapshot(client, vm_id, tmp_path / "kv.wasm", "wasm")
    kv = FakeAbi((tmp_path / "kv.wasm").read_bytes())
    assert kv("size") == before["size"] and kv("checksum") == before["checksum"]
    assert kv("get", input="user:1") == 8 and kv.output == b"Lovelace"
    assert kv("bump") == 4
    assert kv("put", input="user:3=Hamilton") == 5  # malloc goes on from the snapshotted heap
    assert kv("get", input="user:2") == 5 and kv.output == b"Grace"
    assert kv("stack_top") == before["stack_top"]
