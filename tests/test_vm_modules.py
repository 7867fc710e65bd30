"""module.load and vm.create end to end with real guests, over both transports.

What a host sees before any call: module ids and descriptions, the compile cache, the refusals of
bad modules and of imports the sidecar does not provide, and the ways to make a VM.
"""

from __future__ import annotations

import base64

import pytest

from sidecar.wasmbin.reader import encode_unsigned

from .guests import (
    call,
    module_id,
    new_vm,
    refused,
    rpc,
    vm_info,
    wasm,
    wat,
)

pytestmark = pytest.mark.anyio

ABI_IMPORTS = {
    "input_len": ([], ["i32"]),
    "input_read": (["i32"], []),
    "output_write": (["i32", "i32"], []),
    "host_call": (["i32", "i32", "i32", "i32"], ["i32"]),
    "response_read": (["i32"], []),
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- module.load ------------------------------------------------------------------------------


async def test_each_source_gives_the_content_address_of_the_binary(session, tmp_path) -> None:
    binary = wasm("numeric")
    (tmp_path / "numeric.wasm").write_bytes(binary)
    async with session() as (client, _):
        loaded = [
            await rpc(client, "module.load", {"wat": wat("numeric")}),
            await rpc(client, "module.load", {"wasm_base64": b64(binary)}),
            await rpc(client, "module.load", {"path": str(tmp_path / "numeric.wasm")}),
        ]
    assert {result["module_id"] for result in loaded} == {module_id(binary)}
    assert module_id(binary).startswith("sha256:") and len(module_id(binary)) == 7 + 64
    assert {result["size_bytes"] for result in loaded} == {len(binary)}


async def test_the_description_lists_exports_and_imports_with_types(session) -> None:
    async with session() as (client, _):
        numeric = await rpc(client, "module.load", {"wat": wat("numeric")})
        abi = await rpc(client, "module.load", {"wat": wat("abi")})
    exports = {item["name"]: item for item in numeric["exports"]}
    assert exports["add"] == {"name": "add", "kind": "func", "params": ["i32", "i32"], "results": ["i32"]}
    assert exports["swap"]["params"] == ["i32", "i64", "f32", "f64"]
    assert exports["swap"]["results"] == ["f64", "f32", "i64", "i32"]
    assert exports["nothing"] == {"name": "nothing", "kind": "func", "params": [], "results": []}
    assert exports["memory"] == {"name": "memory", "kind": "memory"}
    assert exports["answer"] == {"name": "answer", "kind": "global"}
    assert exports["table"] == {"name": "table", "kind": "table"}
    assert numeric["imports"] == []
    imports = {item["name"]: item for item in abi["imports"]}
    assert set(imports) == set(ABI_IMPORTS)
    for name, (params, results) in ABI_IMPORTS.items():
        expected = {"module": "sidecar", "name": name, "kind": "func", "params": params, "results": results}
        assert imports[name] == expected


async def test_a_second_load_is_cached_in_process_and_across_processes(session, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(tmp_path))  # empty: the first load must compile
    async with session() as (client, _):
        first = await rpc(client, "module.load", {"wat": wat("faults")})
        again = await rpc(client, "module.load", {"wat": wat("faults")})
    assert first["cached"] is False and first["compile_ms"] > 0
    assert again["cached"] is True and again["module_id"] == first["module_id"]
    async with session() as (client, _):  # a new sidecar: only the disk cache remembers
        later = await rpc(client, "module.load", {"wat": wat("faults")})
    assert later["cached"] is True and later["module_id"] == first["module_id"]
    assert later["exports"] == first["exports"]


def _custom_section(size: int) -> bytes:
    """A valid module padded with a custom section to exactly `size` bytes."""
    header = b"\0asm\1\0\0\0"
    name = b"pad"
    for guess in range(size, 0, -1):
        body = bytes([len(name)]) + name + b"\0" * guess
        section = b"\0" + encode_unsigned(len(body)) + body
        if len(header) + len(section) == size:
            return header + section
    raise AssertionError(size)




@pytest.mark.parametrize(
    ("source", "stage"),
    [
        ({"wasm_base64": b64(b"hello, world, not wasm")}, "parse"),
        ({"wasm_base64": b64(b"")}, "parse"),
        ({"wasm_base64": b64(wasm("numeric")[:-7])}, "parse"),  # truncated
        ({"wasm_base64": b64(b"\0asm\2\0\0\0")}, "parse"),  # unknown version
        ({"wat": "(module (func (result i32) (i64.const 1)))"}, "validate"),
        ({"wat": '(module (func (export "f") (call 7)))'}, "validate"),
        ({"wat": "(module (func"}, "parse"),
        ({"path": "/nonexistent/guest.wasm"}, "read"),
        ({"path": "/"}, "read"),
    ],
    ids=["garbage", "empty", "truncated", "version", "type-mismatch", "bad-call", "bad-text", "missing", "directory"],
)
async def test_bad_modules_are_refused_with_the_stage_that_failed(session, source, stage) -> None:
    async with session() as (client, _):
        error = await refused(client, "module.load", source, code=-32005)
        assert error.kind == "invalid_module" and error.data["stage"] == stage, error.data
        assert (await refused(client, "vm.create", source, code=-32005)).data["stage"] == stage
        assert await rpc(client, "ping") == {}


@pytest.mark.parametrize(
    ("guest", "module", "name"),
    [
        ("foreign_import", "env", "now"),
        ("wrong_signature", "sidecar", "input_len"),
        ('(module (import "sidecar" "memory" (memory 1)))', "sidecar", "memory"),
        ('(module (import "env" "memory" (memory 1)))', "env", "memory"),
        ('(module (import "sidecar" "input_len" (global i32)))', "sidecar", "input_len"),
    ],
    ids=["foreign-module", "wrong-signature", "sidecar-memory", "env-memory", "function-as-global"],
)
async def test_vm_create_refuses_imports_the_sidecar_does_not_provide(session, guest, module, name) -> None:
    text = wat(guest) if not guest.startswith("(") else guest
    async with session() as (client, _):
        error = await refused(client, "vm.create", {"wat": text}, code=-32005)
        assert error.data["stage"] == "imports"
        assert (error.data["module"], error.data["name"]) == (module, name)
        assert (await rpc(client, "sidecar.stats"))["vms"] == 0


@pytest.mark.parametrize("guest", ["foreign_import", "wrong_signature"])
async def test_module_load_refuses_imports_the_sidecar_does_not_provide(session, guest) -> None:
    """The spec lists `imports` among module.load's failure stages: a module no VM can ever
    link is refused when loaded, not only when a VM is made of it."""
    async with session() as (client, _):
        error = await refused(client, "module.load", {"wat": wat(guest)}, code=-32005)
        assert error.data["stage"] == "imports"


@pytest.mark.parametrize(
    "text",
    [
        '(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32) (result i32))))',
        '(module (import "wasi_snapshot_preview1" "no_such_call" (func)))',
        '(module (import "wasi_snapshot_preview1" "memory" (memory 1)))',
    ],
    ids=["wasi-wrong-signature", "wasi-unknown-function", "wasi-memory"],
)
async def test_wasi_imports_that_do_not_exist_are_an_imports_error_not_a_trap(session, text) -> None:
    async with session() as (client, _):
        error = await refused(client, "vm.create", {"wat": text}, code=-32005)
        assert error.data["stage"] == "imports"
        assert await rpc(client, "ping") == {}


async def test_over_runner_module_bytes_is_refused_naming_the_limit(session, tmp_path) -> None:
    big = _custom_section(2048)
    (tmp_path / "big.wasm").write_bytes(big)
    async with session(env={"SIDECAR_RUNNER_MODULE_BYTES": "1KiB"}) as (client, _):
        fits = await rpc(client, "module.load", {"wasm_base64": b64(_custom_section(1024))})
        assert fits["size_bytes"] == 1024
        for source in ({"wasm_base64": b64(big)}, {"path": str(tmp_path / "big.wasm")}):
            for method in ("module.load", "vm.create"):
                error = await refused(client, method, source, code=-32002)
                assert error.data["limit"] == "runner_module_bytes"
                assert error.data["env"] == "SIDECAR_RUNNER_MODULE_BYTES"
                assert error.data["capacity"] == 1024 and error.data["observed"] == 2048
        text = wat("abi")  # the text is bounded too, before it is parsed
        assert len(text.encode()) > 1024
        error = await refused(client, "module.load", {"wat": text}, code=-32002)
        assert error.data["limit"] == "runner_module_bytes" and error.data["observed"] == len(text.encode())
        assert await rpc(client, "ping") == {}


# -- vm.create --------------------------------------------------------------------------------


async def test_vm_create_from_a_module_id_or_any_source(session, tmp_path) -> None:
    binary = wasm("numeric")
    (tmp_path / "numeric.wasm").write_bytes(binary)
    async with session() as (client, _):
        loaded = await rpc(client, "module.load", {"wat": wat("numeric")})
        vm_ids = [
            (await rpc(client, "vm.create", params))["vm_id"]
            for params in (
                {"module_id": loaded["module_id"]},
                {"wat": wat("numeric")},
                {"wasm_base64": b64(binary)},
                {"path": str(tmp_path / "numeric.wasm")},
            )
        ]
        assert len(set(vm_ids)) == 4 and all(isinstance(vm_id, str) and vm_id for vm_id in vm_ids)
        for vm_id in vm_ids:
            assert (await call(client, vm_id, "add", 2, 40))["results"] == [42]
            assert (await vm_info(client, vm_id))["module_id"] == module_id(binary)


async def test_vm_create_refuses_unknown_module_ids_and_two_sources(session) -> None:
    async with session() as (client, _):
        unknown = "sha256:" + "0" * 64
        error = await refused(client, "vm.create", {"module_id": unknown}, code=-32005)
        assert error.data["module_id"] == unknown
        await refused(client, "vm.create", {"module_id": "sha256:xyz"}, code=-32602)
        loaded = await rpc(client, "module.load", {"wat": wat("numeric")})
        both = {"module_id": loaded["module_id"], "wat": wat("numeric")}
        await refused(client, "vm.create", both, code=-32602)
        await refused(client, "vm.create", {}, code=-32602)
        await refused(client, "vm.create", {"wat": wat("numeric"), "mode": "sometimes"}, code=-32602)
        assert (await rpc(client, "sidecar.stats"))["vms"] == 0


async def test_mode_is_kept_and_listed(session) -> None:
    async with session() as (client, _):
        default = await new_vm(client, "numeric")
        stateful = await new_vm(client, "numeric", mode="stateful")
        stateless = await new_vm(client, "numeric", mode="stateless")
        assert (await vm_info(client, default))["mode"] == "stateful"
        assert (await vm_info(client, stateful))["mode"] == "stateful"
        assert (await vm_info(client, stateless))["mode"] == "stateless"
        assert (await call(client, stateless, "add", 1, 2))["results"] == [3]
