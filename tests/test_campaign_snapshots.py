"""Hostile snapshot files through `vm.restore` of the real process.

Built from one genuine snapshot (memory past its first page, three mutable globals, a pending
async host call): seeded byte flips at hundreds of offsets, truncations and extensions at many
lengths, seeded edits behind a recomputed checksum (the file then lies consistently, so only
the checks on its meaning can catch it), targeted lies in lengths, counts, nesting and the
embedded module, files that are not regular files, and files over `runner_snapshot_bytes`.
Each must answer -32006 naming its `stage` (or -32002 naming the limit) within a bounded time;
the process must serve on, hold no VM it did not answer for, and log no error. The sidecars here
run under a data-size cap (`capped`), so one that reads without bound fails instead of eating
the machine. `SIDECAR_FUZZ_SEED` replays the seeded cases.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import wasmtime

from protocol.client import RemoteError, SidecarClient
from sidecar import snapshot_file
from sidecar.snapshot_file import GlobalValue, MemoryImage, SnapshotState

from .campaign import capped, fuzz_seed, logged_session, seed_noted
from .guests import call, module_id, rpc, wat
from .snapshot_support import hostile_file_guest, read_state, replace, sealed, snapshot, write_state
from .support import WAIT

pytestmark = pytest.mark.anyio
HEADER = 20  # magic (8), version (4), body length (8)
DIGEST = 32
PAGE = 65536
STAGES = {"read", "format", "version", "checksum", "module", "bounds", "pending"}
CAP = capped(1 << 30)
ENV = {"SIDECAR_RUNNER_SNAPSHOT_BYTES": str(64 << 20)}  # a bounded reader stays far under the cap
RESTORE_WAIT = 5  # seconds: any one restore, however hostile its file

GUEST = hostile_file_guest(pages=2, max_pages=8, store_at=70000)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real snapshot, written by a real process."""
    directory = tmp_path_factory.mktemp("genuine")

    async def hold(vm_id: str, method: str, params: Any) -> Any:
        await anyio.sleep_forever()

    async def make() -> bytes:
        async with logged_session(directory, host_handler=hold) as client:
            vm_id = (await rpc(client, "vm.create", {"wat": GUEST}))["vm_id"]
            await call(client, vm_id, "bump")
            await call(client, vm_id, "ask")
            await snapshot(client, vm_id, directory / "genuine.state")
        return (directory / "genuine.state").read_bytes()

    return anyio.run(make)


class Restorer:
    """Restores files in one sidecar and collects every answer that breaks the contract."""

    def __init__(self, client: SidecarClient, directory: Path) -> None:
        self.client = client
        self.directory = directory
        self.problems: list[str] = []
        self.restored = 0

    async def restore(self, case: str, path: Path, stages: set[str] = STAGES, *, may_restore: bool = False) -> None:
        try:
            with anyio.fail_after(RESTORE_WAIT):
                answer = await self.client.request("vm.restore", {"path": str(path)})
        except TimeoutError:
            self.problems.append(f"{case}: no answer within {RESTORE_WAIT} s")
            raise  # the sidecar is stuck: what follows would only repeat it
        except RemoteError as error:
            self.judge(case, error, stages)
        else:
            if not may_restore:
                self.problems.append(f"{case}: restored {answer}")
            self.restored += 1
            try:  # a file that passed every check makes a VM that works, or traps in the guest
                await call(self.client, answer["vm_id"], "bump")
            except RemoteError as error:
                if error.code != -32003:
                    self.problems.append(f"{case}: the restored VM answered {error.code} {error.message}")
            await rpc(self.client, "vm.dispose", {"vm_id": answer["vm_id"]})  # its pending calls go too

    async def restore_bytes(self, case: str, blob: bytes, stages: set[str] = STAGES, **kw: Any) -> None:
        path = self.directory / "hostile.state"
        path.write_bytes(blob)
        await self.restore(case, path, stages, **kw)

    def judge(self, case: str, error: RemoteError, stages: set[str]) -> None:
        data = error.data if isinstance(error.data, dict) else {}
        if "Traceback" in error.message or "Traceback" in str(data):
            self.problems.append(f"{case}: a traceback on the wire")
        if error.code == -32006 and data.get("stage") in stages:
            return
        if error.code == -32002 and data.get("limit") and data.get("env") == "SIDECAR_" + data["limit"].upper():
            return
        self.problems.append(f"{case}: {error.code} {error.message[:160]} {data} (want -32006 at {sorted(stages)})")

    async def finish(self) -> None:
        """The sidecar serves on and holds no VM left from a refused restore."""
        assert await rpc(self.client, "ping") == {}
        assert (await rpc(self.client, "vm.list"))["vms"] == [], "a refused restore left a VM"
        assert not self.problems, f"{len(self.problems)} problems:\n" + "\n".join(self.problems[:30])


def restorer_session(tmp_path: Path, env: dict[str, str] | None = None) -> Any:
    return logged_session(tmp_path, {**ENV, **(env or {})}, command=CAP)


def stage_of_flip(positions: set[int], size: int) -> str:
    """Where parse() fails first for a file whose bytes at `positions` changed."""
    if any(p < 8 for p in positions):
        return "format"
    if any(p < 12 for p in positions):
        return "version"
    if any(p < HEADER for p in positions):
        return "format"
    return "checksum"


async def test_byte_flips_anywhere_are_refused_at_their_stage(tmp_path: Path, genuine: bytes) -> None:
    seed = fuzz_seed()
    rng = random.Random(seed)
    size = len(genuine)
    offsets = [*range(HEADER), *range(size - DIGEST, size), *rng.sample(range(HEADER, size - DIGEST), 200)]
    with seed_noted(seed), anyio.fail_after(6 * WAIT):
        async with restorer_session(tmp_path) as client:
            restorer = Restorer(client, tmp_path)
            for offset in offsets:
                blob = bytearray(genuine)
                blob[offset] ^= rng.randrange(1, 256)
                await restorer.restore_bytes(f"flip at {offset}", bytes(blob), {stage_of_flip({offset}, size)})
            for _ in range(50):  # several bytes at once
                positions = set(rng.sample(range(size), rng.randrange(2, 9)))
                blob = bytearray(genuine)
                for position in positions:
                    blob[position] ^= rng.randrange(1, 256)
                await restorer.restore_bytes(f"flips at {sorted(positions)}", bytes(blob),
                                             {stage_of_flip(positions, size)})
            await restorer.finish()
            await restorer.restore_bytes("the genuine file", genuine, may_restore=True)
            assert restorer.restored == 1


async def test_truncated_and_extended_files_are_refused(tmp_path: Path, genuine: bytes) -> None:
    seed = fuzz_seed()
    rng = random.Random(seed)
    size = len(genuine)
    lengths = sorted({*range(HEADER + 8), *range(size - DIGEST - 2, size), *rng.sample(range(size), 60)})
    with seed_noted(seed), anyio.fail_after(6 * WAIT):
        async with restorer_session(tmp_path) as client:
            restorer = Restorer(client, tmp_path)
            for length in lengths:
                await restorer.restore_bytes(f"truncated to {length}", genuine[:length], {"format"})
            for extra in (b"\0", b"\n", genuine[-DIGEST:], rng.randbytes(1000), genuine):
                await restorer.restore_bytes(f"extended by {len(extra)}", genuine + extra, {"format"})
            await restorer.finish()


async def test_edits_behind_a_valid_checksum_are_refused_or_make_a_working_vm(tmp_path: Path, genuine: bytes) -> None:
    """Random edits of the body, sealed again: the msgpack decoder, the shape checks and the
    module checks see every kind of lie. An edit that still makes sense (a byte of memory, a
    global's value) may restore; then the VM must work."""
    seed = fuzz_seed()
    rng = random.Random(seed)
    body = genuine[HEADER:-DIGEST]
    with seed_noted(seed), anyio.fail_after(6 * WAIT):
        async with restorer_session(tmp_path) as client:
            restorer = Restorer(client, tmp_path)
            for n in range(250):
                edited = bytearray(body)
                kind = rng.choice(["flip", "insert", "delete", "length"])
                at = rng.randrange(len(edited))
                if kind == "flip":
                    edited[at] ^= rng.randrange(1, 256)
                elif kind == "insert":
                    edited[at:at] = rng.randbytes(rng.randrange(1, 9))
                elif kind == "delete":
                    del edited[at : at + rng.randrange(1, 9)]
                else:  # a byte that msgpack reads as a length or count, made large
                    edited[at] = rng.choice([0xDC, 0xDD, 0xDE, 0xDF, 0xC5, 0xC6, 0xDA, 0xDB, 0x9F, 0x8F, 0xBF])
                await restorer.restore_bytes(f"edit {n}: {kind} at {at}", sealed(bytes(edited)), may_restore=True)
            await restorer.finish()


# -- targeted lies with a valid checksum ---------------------------------------------------------


def wasm(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def with_module(state: SnapshotState, module: bytes) -> SnapshotState:
    return replace(state, module=module, module_id=module_id(module))


def deep_in(state: SnapshotState, field: str, nest: bytes) -> bytes:
    """The state with `field`'s value replaced by raw msgpack `nest`, sealed."""
    marker = "\x01nest-here\x01"
    body = msgspec.msgpack.encode(replace(state, **{field: {"args": marker}}))
    return sealed(body.replace(msgspec.msgpack.encode(marker), nest))


GLOBALS = "(global (mut i32) (i32.const 0)) (global (mut i64) (i64.const 0)) (global (mut f64) (f64.const 0))"
UNFITTING = {  # embedded modules the snapshot's state does not fit, each under its own correct id
    "not wasm": b"hello",
    "truncated wasm": b"\0asm\x01\0\0\0\xff",
    "a component": b"\0asm\x0d\0\x01\0",
    "imports env": wasm(f'(module (import "env" "f" (func)) (memory 2 8) {GLOBALS})'),
    "imports an unknown sidecar function": wasm(f'(module (import "sidecar" "nope" (func)) (memory 2 8) {GLOBALS})'),
    "no memory": wasm(f"(module {GLOBALS})"),
    "two memories": wasm(f"(module (memory 2 8) (memory 1) {GLOBALS})"),
    "64-bit memory": wasm(f"(module (memory i64 2 8) {GLOBALS})"),
    "shared memory": wasm(f"(module (memory 2 8 shared) {GLOBALS})"),
    "globals of other types": wasm("(module (memory 2 8) (global (mut f32) (f32.const 0)) "
                                   "(global (mut i32) (i32.const 0)) (global (mut i64) (i64.const 0)))"),
    "memory minimum above the image": wasm(f"(module (memory 100) {GLOBALS})"),
    "memory maximum below the image": wasm(f"(module (memory 1 1) {GLOBALS})"),
    "memory minimum over the budget": wasm(f"(module (memory 65536) {GLOBALS})"),
    "data segment out of bounds": wasm(f'(module (memory 2 8) {GLOBALS} (data (i32.const 200000) "x"))'),
    "element segment out of bounds": wasm(f"(module (memory 2 8) {GLOBALS} (table 1 funcref) (func $f) "
                                          "(elem (i32.const 5) $f))"),
    "table over vm_table_elements": wasm(f"(module (memory 2 8) {GLOBALS} (table 200000 funcref))"),
    "tables over vm_tables": wasm(f"(module (memory 2 8) {GLOBALS}" + " (table 1 funcref)" * 17 + ")"),
    "memories over vm_memories": wasm(f"(module (memory 2 8) {GLOBALS}" + " (memory 1)" * 4 + ")"),
}


def lies(state: SnapshotState) -> Iterator[tuple[str, Callable[[], bytes], set[str]]]:
    """(case, the file's bytes, the stages it may be refused at)."""
    memory = state.memories[0]
    for name, module in UNFITTING.items():
        yield f"module: {name}", lambda m=module: snapshot_file.encode(with_module(state, m)), {"module", "bounds"}
    for field in ("wasi", "limits"):
        for nest in (b"\x91" * 100_000 + b"\xc0", b"\x81\xa1a" * 100_000 + b"\xc0", b"\xdd\xff\xff\xff\xff"):
            yield f"{field} nested {nest[:3]!r}...", lambda f=field, n=nest: deep_in(state, f, n), {"format", "bounds"}
    yield "body nested", lambda: sealed(b"\x91" * 200_000 + b"\xc0"), {"format"}
    yield "body a huge array", lambda: sealed(b"\xdd\xff\xff\xff\xff"), {"format"}
    yield "module length 4 GiB", lambda: sealed(b"\x81\xa6module\xc6\xff\xff\xff\xff"), {"format"}
    yield "memory size 2**64-1", lambda: snapshot_file.encode(replace(
        state, memories=[replace(memory, size_bytes=2**64 - 1)])), {"bounds"}
    yield "run at 2**64-1", lambda: snapshot_file.encode(replace(
        state, memories=[replace(memory, runs=[(2**64 - 1, b"\x01")])])), {"bounds"}
    yield "100,000 one-byte runs", lambda: snapshot_file.encode(replace(
        state, memories=[replace(memory, runs=[(2 * i, b"\x01") for i in range(100_000)])])), {"bounds", "format"}
    yield "100,000 memories", lambda: snapshot_file.encode(replace(
        state, memories=[MemoryImage(i, PAGE, []) for i in range(100_000)])), {"module", "bounds", "format"}
    yield "100,000 globals", lambda: snapshot_file.encode(replace(
        state, globals=[GlobalValue(i, "i32", 0) for i in range(100_000)])), {"module", "bounds", "format"}
    yield "100,000 pending calls", lambda: snapshot_file.encode(replace(
        state, pending_host_calls=[replace(state.pending_host_calls[0], id=f"feedbeef0000.{i}", ticket=i)
                                   for i in range(100_000)], next_ticket=100_000)), {"bounds", "format"}
    yield "pending params 1 MiB deep", lambda: snapshot_file.encode(replace(
        state, pending_host_calls=[replace(state.pending_host_calls[0], params=b"[" * 500_000 + b"]" * 500_000)])), {
        "bounds", "format"}
    yield "limits far above the ceiling", lambda: snapshot_file.encode(replace(
        state, limits={"vm_memory_bytes": 2**63})), {"bounds"}


async def test_lies_behind_a_valid_checksum_are_refused(tmp_path: Path, genuine: bytes) -> None:
    state = snapshot_file.parse(genuine)
    with anyio.fail_after(6 * WAIT):
        async with restorer_session(tmp_path) as client:
            restorer = Restorer(client, tmp_path)
            for case, build, stages in lies(state):
                await restorer.restore_bytes(case, build(), stages)
            await restorer.finish()
            await restorer.restore_bytes("the genuine file", genuine, may_restore=True)
            assert restorer.restored == 1


# -- what is not a regular file -----------------------------------------------------------------


def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.state"
    os.mkfifo(path)
    return path


def unix_socket(tmp_path: Path) -> Path:
    path = tmp_path / "socket.state"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.close()  # the file stays; nothing listens
    return path


def symlink_to_zero(tmp_path: Path) -> Path:
    path = tmp_path / "zero.state"
    path.symlink_to("/dev/zero")
    return path


NOT_REGULAR: dict[str, Callable[[Path], Path]] = {
    "/dev/zero": lambda _: Path("/dev/zero"),
    "/dev/urandom": lambda _: Path("/dev/urandom"),
    "/dev/null": lambda _: Path("/dev/null"),
    "a FIFO nobody writes": fifo,
    "a socket": unix_socket,
    "a directory": lambda tmp_path: tmp_path,
    "a symlink to /dev/zero": symlink_to_zero,
    "/proc/self/status": lambda _: Path("/proc/self/status"),
}


@pytest.mark.parametrize("kind", list(NOT_REGULAR))
async def test_a_path_that_is_not_a_regular_file_is_refused_promptly(tmp_path: Path, kind: str) -> None:
    path = NOT_REGULAR[kind](tmp_path)
    try:
        with anyio.fail_after(4 * WAIT):
            async with restorer_session(tmp_path) as client:
                restorer = Restorer(client, tmp_path)
                await restorer.restore(kind, path, {"read", "format", "bounds"})
                await restorer.finish()
    finally:
        if kind.startswith("a FIFO"):
            release(path)


def release(path: Path) -> None:
    """Open a FIFO's writing end once (from a thread: it blocks until a reader is there, if one
    ever is), so a sidecar stuck opening it for reading gets end of file and can exit."""
    def open_and_close() -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return  # no reader: nothing is stuck on it
        os.close(fd)

    thread = threading.Thread(target=open_and_close, daemon=True)
    thread.start()
    thread.join(1)


async def test_a_file_over_runner_snapshot_bytes_is_refused_before_it_is_read(tmp_path: Path, genuine: bytes) -> None:
    sparse = tmp_path / "sparse.state"
    with sparse.open("wb") as handle:  # 8 GiB that take no disk: reading it whole would take minutes
        handle.write(genuine[:HEADER])
        handle.truncate(8 << 30)
    with anyio.fail_after(4 * WAIT):
        async with restorer_session(tmp_path) as client:
            with anyio.fail_after(RESTORE_WAIT), pytest.raises(RemoteError) as caught:
                await client.request("vm.restore", {"path": str(sparse)})
            assert caught.value.code in (-32006, -32002), caught.value
            data = caught.value.data
            assert data["limit"] == "runner_snapshot_bytes" and data["capacity"] == 64 << 20, data
            assert data["observed"] == 8 << 30, data
            assert await rpc(client, "ping") == {}
    async with restorer_session(tmp_path, {"SIDECAR_RUNNER_SNAPSHOT_BYTES": str(len(genuine) - 1)}) as client:
        restorer = Restorer(client, tmp_path)
        await restorer.restore_bytes("one byte over", genuine, {"bounds"})
        await restorer.finish()
        assert restorer.problems == []


async def test_a_snapshot_grants_no_host_directory(tmp_path: Path) -> None:
    """The file says the VM had `/` preopened: the restored VM must not see the host's files."""
    (tmp_path / "box").mkdir()
    (tmp_path / "box" / "allowed.txt").write_text("inside")
    with anyio.fail_after(4 * WAIT):
        async with restorer_session(tmp_path) as client:
            preopens = [{"host_path": str(tmp_path / "box"), "guest_path": "/box"}]
            vm_id = (await rpc(client, "vm.create", {"wat": wat("opener"), "wasi": {"preopens": preopens}}))["vm_id"]
            await snapshot(client, vm_id, tmp_path / "opener.state")
            state = read_state(tmp_path / "opener.state")
            assert state.wasi.get("preopens", []) in ([], preopens), state.wasi
            for wasi in ({"preopens": [{"host_path": "/", "guest_path": "/"}]},
                         {"preopens": [{"host_path": "/", "guest_path": "/box"}], "args": ["x"]}):
                hostile = write_state(tmp_path / "hostile.state", replace(state, wasi=wasi))
                try:
                    restored = (await rpc(client, "vm.restore", {"path": str(hostile)}))["vm_id"]
                except RemoteError as error:  # refusing the file is as good as ignoring its preopens
                    assert error.code == -32006, error
                    continue
                for path in ("etc/passwd", "etc/hostname", "proc/self/environ", str(tmp_path / "box" / "allowed.txt")):
                    answer = await rpc(client, "vm.call", {"vm_id": restored, "export": "open", "input": path,
                                                           "args": [3, 0, 2]})
                    assert answer["results"] != [0] and answer["output"] == "", (wasi, path, answer)
                await rpc(client, "vm.dispose", {"vm_id": restored})
