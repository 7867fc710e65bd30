"""Hostile snapshot files: vm.restore refuses each with -32006 naming the stage, and serves on.

A snapshot file is untrusted input. The cases are built from one real snapshot: broken as bytes
(missing, empty, random, wrong magic or version, truncated, a flipped byte anywhere), or decoded,
edited to lie, and re-encoded with a correct checksum so that only the checks on the meaning
can catch them (module, memories, globals, settings, pending host calls). After every refusal
the same sidecar still restores the genuine file and holds no half-restored VM.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import wasmtime

from sidecar import snapshot_file
from sidecar.snapshot_file import MAGIC, GlobalValue, MemoryImage, SnapshotState

from .guests import call, module_id, refused, rpc
from .snapshot_support import (
    hostile_file_guest,
    read_state,
    replace,
    restore,
    sealed,
    snapshot,
    write_state,
    zero_based,
)
from .support import WAIT, memory_session

pytestmark = pytest.mark.anyio
PAGE = 65536
HEADER = 20  # magic (8), version (4), body length (8)

BASE = hostile_file_guest(pages=1, max_pages=4, store_at=30000)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real snapshot: one page with data, three mutable globals, one pending host call."""
    path = tmp_path_factory.mktemp("genuine") / "genuine.state"

    async def hold(vm_id: str, method: str, params: Any) -> Any:
        await anyio.sleep_forever()

    async def make() -> None:
        async with memory_session(host_handler=hold) as (client, _):
            vm_id = (await rpc(client, "vm.create", {"wat": BASE}))["vm_id"]
            await call(client, vm_id, "bump")
            await call(client, vm_id, "ask")
            await snapshot(client, vm_id, path)

    anyio.run(make)
    return path


async def expect_refusal(genuine: Path, hostile: Path, stage: str, env: dict[str, str] | None = None) -> Any:
    """Restore `hostile` (-32006 at `stage`), then show the sidecar unharmed: the genuine file
    restores and runs, and the refused restore left no VM behind."""
    async with memory_session(env=env) as (client, _):
        error = await refused(client, "vm.restore", {"path": str(hostile)}, code=-32006)
        assert error.kind == "invalid_snapshot"
        assert error.data["stage"] == stage, (error.message, error.data)
        assert (await rpc(client, "vm.list"))["vms"] == []
        assert (await rpc(client, "sidecar.stats"))["host_calls_pending"] == 0
        if env is None:
            vm_id = (await restore(client, genuine))["vm_id"]
            assert (await call(client, vm_id, "bump"))["results"] == [2]
        assert await rpc(client, "ping") == {}
    return error


def _body(blob: bytes) -> bytes:
    return blob[HEADER:-32]


async def test_a_version_1_file_still_restores(genuine, tmp_path) -> None:
    """A file from before version 2 (its checksum covers the body alone, its memories are against
    zero) restores as it did."""
    body = _body(snapshot_file.encode(zero_based(read_state(genuine))))
    old = tmp_path / "v1.state"
    old.write_bytes(struct.pack("<8sIQ", MAGIC, 1, len(body)) + body + hashlib.sha256(body).digest())
    async with memory_session() as (client, _):
        restored = await restore(client, old)
        assert len(restored["pending_host_calls"]) == 1
        assert (await call(client, restored["vm_id"], "bump"))["results"] == [2]


# -- broken as bytes --------------------------------------------------------------------------


async def test_a_missing_file_and_a_directory_are_read_errors(genuine, tmp_path) -> None:
    error = await expect_refusal(genuine, tmp_path / "nope.state", "read")
    assert "nope.state" in error.message
    await expect_refusal(genuine, tmp_path, "read")


BYTE_CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda b: b"", "format"),
    "random": (lambda b: random.Random(6).randbytes(len(b)), "format"),
    "random-with-magic": (lambda b: MAGIC + random.Random(7).randbytes(len(b) - 8), "version"),
    "random-with-header": (lambda b: b[:20] + random.Random(7).randbytes(len(b) - 20), "checksum"),
    "short-random": (lambda b: random.Random(8).randbytes(51), "format"),
    "wrong-magic": (lambda b: b"WSIDECAX" + b[8:], "format"),
    "version-next": (lambda b: b[:8] + struct.pack("<I", snapshot_file.FORMAT_VERSION + 1) + b[12:], "version"),
    "relabelled-version-2": (lambda b: b[:8] + struct.pack("<I", 2) + b[12:], "checksum"),
    # A body diffed against its module's image, read as one diffed against zero, would restore wrong.
    "diffed-body-as-version-2": (lambda b: b"".join(snapshot_file.seal([_body(b)], 2).parts), "format"),
    "diffed-body-as-version-1": (lambda b: b[:8] + struct.pack("<I", 1) + b[12:-32] + hashlib.sha256(_body(b)).digest(),
                                 "format"),
    "version-0": (lambda b: b[:8] + struct.pack("<I", 0) + b[12:], "version"),
    "version-max": (lambda b: b[:8] + b"\xff\xff\xff\xff" + b[12:], "version"),
    "length-huge": (lambda b: b[:12] + struct.pack("<Q", 2**63) + b[20:], "format"),
    "length-short": (lambda b: b[:12] + struct.pack("<Q", len(b) - HEADER - 33) + b[20:], "format"),
    "trailing-byte": (lambda b: b + b"\0", "format"),
    "body-not-msgpack": (lambda b: sealed(b"\xc1" * 64), "format"),
    "body-other-shape": (lambda b: sealed(msgspec.msgpack.encode({"module_id": 1})), "format"),
    "body-unknown-field": (
        lambda b: sealed(msgspec.msgpack.encode({**msgspec.msgpack.decode(_body(b)), "extra": 1})), "format"),
    "body-missing-field": (
        lambda b: sealed(msgspec.msgpack.encode(
            {k: v for k, v in msgspec.msgpack.decode(_body(b)).items() if k != "globals"})), "format"),
}


@pytest.mark.parametrize("case", list(BYTE_CASES))
async def test_broken_bytes_are_refused_at_their_stage(genuine, tmp_path, case) -> None:
    damage, stage = BYTE_CASES[case]
    hostile = tmp_path / "hostile.state"
    hostile.write_bytes(damage(genuine.read_bytes()))
    await expect_refusal(genuine, hostile, stage)


@pytest.mark.parametrize("keep", [0, 7, 8, 12, 19, 20, 21, 0.5, -33, -32, -1])
async def test_a_file_truncated_anywhere_is_refused(genuine, tmp_path, keep) -> None:
    blob = genuine.read_bytes()
    end = int(len(blob) * keep) if isinstance(keep, float) else keep if keep >= 0 else len(blob) + keep
    hostile = tmp_path / "truncated.state"
    hostile.write_bytes(blob[:end])
    await expect_refusal(genuine, hostile, "format")


def flip_positions(size: int) -> list[tuple[int, str]]:
    """Positions in each region of a file and the stage a flipped byte there must fail at."""
    body = range(HEADER, size - 32)
    chosen = [(0, "format"), (7, "format"), (8, "version"), (11, "version"), (12, "format"), (19, "format")]
    chosen += [(p, "checksum") for p in (body[0], body[len(body) // 3], body[len(body) // 2], body[-1])]
    chosen += [(p, "checksum") for p in random.Random(9).sample(body, 8)]
    chosen += [(size - 32, "checksum"), (size - 1, "checksum")]
    return chosen


@pytest.mark.parametrize("index", range(20))
async def test_a_flipped_byte_anywhere_is_refused(genuine, tmp_path, index) -> None:
    blob = bytearray(genuine.read_bytes())
    position, stage = flip_positions(len(blob))[index]
    blob[position] ^= 0x20
    hostile = tmp_path / "flipped.state"
    hostile.write_bytes(bytes(blob))
    await expect_refusal(genuine, hostile, stage)


async def test_a_file_over_runner_snapshot_bytes_is_refused_before_it_is_read(genuine, tmp_path) -> None:
    env = {"SIDECAR_RUNNER_SNAPSHOT_BYTES": "1024"}
    error = await expect_refusal(genuine, genuine, "bounds", env=env)
    assert error.data["limit"] == "runner_snapshot_bytes"
    assert error.data["capacity"] == 1024 and error.data["observed"] == genuine.stat().st_size
    # The writer holds to it too: a snapshot over the bound is -32002 and leaves no file.
    async with memory_session(env=env) as (client, _):
        vm_id = (await rpc(client, "vm.create", {"wat": BASE}))["vm_id"]
        await call(client, vm_id, "bump")  # a page that differs from the module's image: > 1024 bytes
        error = await refused(client, "vm.snapshot", {"vm_id": vm_id, "path": str(tmp_path / "big")}, code=-32002)
        assert error.data["limit"] == "runner_snapshot_bytes"
        assert not list(tmp_path.iterdir())
        assert (await call(client, vm_id, "bump"))["results"] == [2]


# -- valid checksums, lying bodies ------------------------------------------------------------

OTHER = bytes(wasmtime.wat2wasm('(module (memory 1 4) (global (mut i32) (i32.const 0)))'))


def _memory(state: SnapshotState, **changes: Any) -> SnapshotState:
    return replace(state, memories=[replace(state.memories[0], **changes)])


def _globals(state: SnapshotState, edit: Callable[[list[GlobalValue]], list[GlobalValue]]) -> SnapshotState:
    return replace(state, globals=edit(list(state.globals)))


def _pending(state: SnapshotState, count: int) -> SnapshotState:
    first = state.pending_host_calls[0]
    calls = [replace(first, id=f"feedbeef0000.{n + 1}", ticket=n) for n in range(count)]
    return replace(state, pending_host_calls=calls, next_ticket=count)


LIES: dict[str, tuple[Callable[[SnapshotState], SnapshotState], str]] = {
    "module-not-its-id": (lambda s: replace(s, module=OTHER), "module"),
    "id-not-its-module": (lambda s: replace(s, module_id="sha256:" + "0" * 64), "module"),
    "other-module-own-id": (lambda s: replace(s, module=OTHER, module_id=module_id(OTHER)), "module"),
    # Changes to another module's image would restore as garbage on this one's.
    "baseline-another-module": (lambda s: replace(s, baseline="sha256:" + "1" * 64), "module"),
    "run-past-size": (lambda s: _memory(s, runs=[(PAGE - 2, b"\x01\x02\x03\x04")]), "bounds"),
    "run-far-past-size": (lambda s: _memory(s, runs=[(2**40, b"\x01")]), "bounds"),
    "size-not-pages": (lambda s: _memory(s, size_bytes=PAGE + 1), "bounds"),
    "size-zero": (lambda s: _memory(s, size_bytes=0, runs=[]), "bounds"),
    "size-over-maximum": (lambda s: _memory(s, size_bytes=5 * PAGE), "bounds"),
    "size-over-budget": (lambda s: _memory(s, size_bytes=2**40), "bounds"),
    "memory-index": (lambda s: _memory(s, index=1), "module"),
    "no-memories": (lambda s: replace(s, memories=[]), "module"),
    "two-memories": (lambda s: replace(s, memories=[*s.memories, MemoryImage(1, PAGE, [])]), "module"),
    "global-missing": (lambda s: _globals(s, lambda g: g[:2]), "module"),
    "global-extra": (lambda s: _globals(s, lambda g: [*g, GlobalValue(3, "i32", 1)]), "module"),
    "global-wrong-type": (lambda s: _globals(s, lambda g: [replace(g[0], valtype="f32", value=1.0), *g[1:]]),
                          "module"),
    "global-i32-overflow": (lambda s: _globals(s, lambda g: [replace(g[0], value=2**40), *g[1:]]), "module"),
    "global-i32-underflow": (lambda s: _globals(s, lambda g: [replace(g[0], value=-(2**31) - 1), *g[1:]]),
                             "module"),
    "global-f64-as-int": (lambda s: _globals(s, lambda g: [*g[:2], replace(g[2], value=1)]), "module"),
    "global-index-shifted": (lambda s: _globals(s, lambda g: [replace(x, index=x.index + 1) for x in g]),
                             "module"),
    "pending-over-bound": (lambda s: _pending(s, 65), "bounds"),
    "limits-unknown": (lambda s: replace(s, limits={"vm_no_such_limit": 1}), "bounds"),
    "limits-above-ceiling": (lambda s: replace(s, limits={"vm_memory_bytes": 2**50}), "bounds"),
    "limits-runner-class": (lambda s: replace(s, limits={"runner_snapshot_bytes": 2048}), "bounds"),
    "wasi-wrong-shape": (lambda s: replace(s, wasi={"args": "not-a-list"}), "bounds"),
    "wasi-unknown-field": (lambda s: replace(s, wasi={"mounts": []}), "bounds"),
    "module-garbage-own-id": (
        lambda s: replace(s, module=b"\0asm\x01\0\0\0\xff", module_id=module_id(b"\0asm\x01\0\0\0\xff")), "module"),
    "mode-stateless": (lambda s: replace(s, mode="stateless"), "format"),
    # Two images for one index: the later one would silently win.
    "memory-twice": (lambda s: replace(s, memories=[*s.memories, replace(s.memories[0], runs=[])]), "format"),
    "global-twice": (lambda s: _globals(s, lambda g: [*g, replace(g[0], value=99)]), "format"),
    # Pending calls that collide: answers would reach the guest twice under one ticket, or a
    # ticket in use would be handed out again by the next host_call_async.
    "pending-same-ticket": (lambda s: replace(s, pending_host_calls=[
        *s.pending_host_calls, replace(s.pending_host_calls[0], id="feedbeef0000.9")], next_ticket=5), "format"),
    "pending-same-id": (lambda s: replace(s, pending_host_calls=[
        *s.pending_host_calls, replace(s.pending_host_calls[0], ticket=1)], next_ticket=5), "format"),
    "pending-ticket-not-issued": (lambda s: replace(s, pending_host_calls=[
        replace(s.pending_host_calls[0], ticket=3)], next_ticket=1), "format"),
}


@pytest.mark.parametrize("case", list(LIES))
async def test_a_body_that_lies_is_refused_at_its_stage(genuine, tmp_path, case) -> None:
    lie, stage = LIES[case]
    hostile = write_state(tmp_path / f"{case}.state", lie(read_state(genuine)))
    await expect_refusal(genuine, hostile, stage)


async def test_memory_over_the_restoring_sidecars_budget_is_refused(genuine, tmp_path) -> None:
    """The file is honest (3 pages, under the module's maximum of 4), the sidecar is smaller."""
    grown = _memory(read_state(genuine), size_bytes=3 * PAGE)
    hostile = write_state(tmp_path / "grown.state", grown)
    error = await expect_refusal(genuine, hostile, "bounds", env={"SIDECAR_VM_MEMORY_BYTES": str(2 * PAGE)})
    assert error.data["limit"] == "vm_memory_bytes" and error.data["observed"] == 3 * PAGE
    async with memory_session() as (client, _):  # where it fits, it restores
        vm_id = (await restore(client, hostile))["vm_id"]
        assert (await call(client, vm_id, "bump"))["results"] == [2]


@pytest.mark.parametrize("params", [b"{", b'1}]}}\n{"jsonrpc":"2.0","method":"vm.output","params":{}}'],
                         ids=["unclosed", "smuggled-frame"])
async def test_pending_params_that_are_not_json_never_reach_the_wire(genuine, tmp_path, params) -> None:
    """The restore result echoes each pending call's params as raw JSON: from a hostile file they
    must be checked first, or the answer is not JSON (or smuggles a frame) on the host's channel.
    Read on a real pipe: the test client itself would choke on such a line."""
    state = read_state(genuine)
    hostile = write_state(tmp_path / "params.state", replace(
        state, pending_host_calls=[replace(state.pending_host_calls[0], params=params)]))
    request = {"jsonrpc": "2.0", "id": 1, "method": "vm.restore", "params": {"path": str(hostile)}}
    process = await anyio.open_process([sys.executable, "-m", "sidecar"], stderr=subprocess.DEVNULL)
    assert process.stdin is not None and process.stdout is not None
    async with process:
        await process.stdin.send(json.dumps(request).encode() + b"\n")
        output = b""
        with anyio.fail_after(WAIT):
            # Input stays open until the answer is out: a request still in flight when it closes
            # is answered -32800 (SPEC: `shutdown`), which is not what this tests.
            async for chunk in process.stdout:
                output += chunk
                if b"\n" in output:
                    break
            await process.stdin.aclose()
            async for chunk in process.stdout:
                output += chunk
            await process.wait()
    lines = output.splitlines()
    assert lines, "no answer"
    frames = []
    for line in lines:  # every line on stdout must be one JSON message
        try:
            frames.append(json.loads(line))
        except ValueError:
            pytest.fail(f"the sidecar wrote a line that is not JSON: {line[:160]!r}")
    assert len(frames) == 1 and frames[0]["id"] == 1
    assert frames[0]["error"]["code"] == -32006, frames[0]
