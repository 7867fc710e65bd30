"""What the snapshot tests share: their guests, a look at a VM's whole state, and file surgery.

The WAT guests keep their state where a snapshot can only reach it through the load-time
instrumentation: mutable globals and a memory that are not exported. `observe` reads all of it
through the guests' own getters, so a test compares the state before a snapshot with the state
after a restore in one assertion. `ManualHost` holds the sidecar's `host.call` requests so a
test can answer them by id, late, twice, or in another process. The C guest
(`tests/guests/c/kv.wasm`) is committed build output; `tests/guests/c/build.sh` rebuilds it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections import deque
from pathlib import Path
from typing import Any

import anyio
import msgspec

from protocol.client import SidecarClient
from sidecar import snapshot_file
from sidecar.snapshot_file import GlobalValue, MemoryImage, SnapshotState
from sidecar.wasmbin import Module as WasmModule
from sidecar.wasmbin.reader import Reader
from sidecar.wasmbin.sections import decode

from .guests import GUESTS, call, rpc
from .support import WAIT

# Hidden state in every place a wasm module keeps it: a non-exported memory (which the guest grows),
# non-exported mutable globals of each numeric type, and a start function that counts its runs,
# in a global and in hidden memory, and tells the host (a `host_call` the host can count).
KEEPER = r"""
(module
  (import "sidecar" "host_call" (func $host_call (param i32 i32 i32 i32) (result i32)))
  (memory $visible (export "memory") 1 64)
  (memory $hidden 1 8)
  (global $i32 (mut i32) (i32.const 7))
  (global $i64 (mut i64) (i64.const 0))
  (global $f32 (mut f32) (f32.const 0))
  (global $f64 (mut f64) (f64.const 0))
  (global $starts (mut i32) (i32.const 0))
  (global $constant i32 (i32.const 99))
  (data (memory $visible) (i32.const 0) "started")
  (data (memory $hidden) (i32.const 64) "hidden-init")
  (func $start
    (global.set $starts (i32.add (global.get $starts) (i32.const 1)))
    (i32.store $hidden (i32.const 0) (i32.add (i32.load $hidden (i32.const 0)) (i32.const 1)))
    (drop (call $host_call (i32.const 0) (i32.const 7) (i32.const 0) (i32.const 0))))
  (start $start)
  ;; changes every piece of state by an amount that depends on n
  (func (export "step") (param $n i32) (result i32)
    (global.set $i32 (i32.add (global.get $i32) (local.get $n)))
    (global.set $i64 (i64.sub (global.get $i64) (i64.mul (i64.extend_i32_s (local.get $n)) (i64.const 1000000000000))))
    (global.set $f32 (f32.add (global.get $f32) (f32.const 0.5)))
    (global.set $f64 (f64.sub (global.get $f64) (f64.const 0.125)))
    (i32.store $hidden (i32.const 4096) (i32.add (i32.load $hidden (i32.const 4096)) (local.get $n)))
    (i32.store $visible (i32.const 60000) (i32.mul (global.get $i32) (i32.const 3)))
    (global.get $i32))
  ;; the hidden memory grows to `pages` pages, and its last page gets a marker
  (func (export "grow_hidden") (param $pages i32) (result i32)
    (if (i32.lt_u (memory.size $hidden) (local.get $pages))
      (then (drop (memory.grow $hidden (i32.sub (local.get $pages) (memory.size $hidden))))))
    (i32.store $hidden (i32.sub (i32.mul (memory.size $hidden) (i32.const 65536)) (i32.const 4))
      (i32.add (memory.size $hidden) (i32.const 0x5a5a0000)))
    (memory.size $hidden))
  (func (export "g_i32") (result i32) (global.get $i32))
  (func (export "g_i64") (result i64) (global.get $i64))
  (func (export "g_f32") (result f32) (global.get $f32))
  (func (export "g_f64") (result f64) (global.get $f64))
  (func (export "starts") (result i32) (global.get $starts))
  (func (export "constant") (result i32) (global.get $constant))
  (func (export "hidden_pages") (result i32) (memory.size $hidden))
  (func (export "hidden_load") (param $address i32) (result i32) (i32.load $hidden (local.get $address)))
  (func (export "hidden_top") (result i32)
    (i32.load $hidden (i32.sub (i32.mul (memory.size $hidden) (i32.const 65536)) (i32.const 4))))
  (func (export "visible_load") (param $address i32) (result i32) (i32.load $visible (local.get $address)))
)
"""
KEEPER_GETTERS = ("g_i32", "g_i64", "g_f32", "g_f64", "starts", "constant", "hidden_pages", "hidden_top")
KEEPER_LOADS = {"hidden_load": (0, 64, 68, 4096), "visible_load": (0, 60000)}

# A counter in a module with no exports but functions: its only memory and global are internal.
SECRET = """
(module
  (memory 1)
  (global $count (mut i32) (i32.const 0))
  (func (export "next") (result i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (i32.store (i32.const 40000) (i32.mul (global.get $count) (i32.const 10)))
    (global.get $count))
  (func (export "stored") (result i32) (i32.load (i32.const 40000)))
)
"""

# Memory that grows to PAGES pages and gets a few bytes near its end: mostly zeros.
SPARSE = """
(module
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  (func (export "fill") (result i32)
    (drop (memory.grow (i32.sub (i32.const PAGES) (memory.size))))
    (i64.store (i32.const 1000) (i64.const 0x0123456789abcdef))
    (i32.store (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 4)) (i32.const 0x600dcafe))
    (memory.size))
  (func (export "next") (result i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (global.get $count))
  (func (export "tail") (result i32) (i32.load (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 4))))
  (func (export "head") (result i64) (i64.load (i32.const 1000)))
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
)
"""


# Async host calls: `ask` sends host_call_async("kv.get", <its input>) and returns the ticket; the
# answer's ticket, status and length land in globals, its JSON at 1024 (`answer` outputs it).
WAITER = r"""
(module
  (import "sidecar" "input_len" (func $input_len (result i32)))
  (import "sidecar" "input_read" (func $input_read (param i32)))
  (import "sidecar" "output_write" (func $output_write (param i32 i32)))
  (import "sidecar" "host_call_async" (func $host_call_async (param i32 i32 i32 i32) (result i64)))
  (import "sidecar" "response_read" (func $response_read (param i32)))
  (memory (export "memory") 1)
  (global $answers (mut i32) (i32.const 0))
  (global $ticket (mut i64) (i64.const -1))
  (global $status (mut i32) (i32.const 1))
  (global $length (mut i32) (i32.const -1))
  (global $sum (mut i64) (i64.const 0))
  (data (i32.const 0) "kv.get")
  (func (export "ask") (result i64)
    (call $input_read (i32.const 256))
    (call $host_call_async (i32.const 0) (i32.const 6) (i32.const 256) (call $input_len)))
  (func (export "sidecar_on_response") (param $ticket i64) (param $status i32) (param $length i32)
    (global.set $answers (i32.add (global.get $answers) (i32.const 1)))
    (global.set $ticket (local.get $ticket))
    (global.set $status (local.get $status))
    (global.set $length (local.get $length))
    (global.set $sum (i64.add (global.get $sum) (i64.add (local.get $ticket) (i64.const 1))))
    (call $response_read (i32.const 1024)))
  (func (export "answer") (call $output_write (i32.const 1024) (global.get $length)))
  (func (export "answers") (result i32) (global.get $answers))
  (func (export "ticket") (result i64) (global.get $ticket))
  (func (export "status") (result i32) (global.get $status))
  (func (export "tickets_sum") (result i64) (global.get $sum))
)
"""

async def observe(client: SidecarClient, vm_id: str) -> dict[str, Any]:
    """Every piece of the keeper's state, through its getters."""
    seen: dict[str, Any] = {}
    for name in KEEPER_GETTERS:
        seen[name] = (await call(client, vm_id, name))["results"][0]
    for name, addresses in KEEPER_LOADS.items():
        for address in addresses:
            seen[f"{name}({address})"] = (await call(client, vm_id, name, address))["results"][0]
    return seen


async def snapshot(client: SidecarClient, vm_id: str, path: Path, format: str = "state") -> dict[str, Any]:
    answer = await rpc(client, "vm.snapshot", {"vm_id": vm_id, "path": str(path), "format": format})
    assert answer["path"] == str(path) and answer["size_bytes"] == path.stat().st_size
    return answer


async def restore(client: SidecarClient, path: Path, **params: Any) -> dict[str, Any]:
    return await rpc(client, "vm.restore", {"path": str(path), **params})


class ManualHost:
    """Takes over a client's `host.call` serving: each request the sidecar sends is queued
    unanswered, with its wire id, for `next`; the test answers it (or never does) with `answer`.

    `SidecarClient` hands host calls to `_serve_host_call`; replacing it on the instance is the
    one place these tests reach into the client, because its handlers never see request ids.
    """

    def __init__(self, client: SidecarClient) -> None:
        self.client = client
        self._received: deque[dict[str, Any]] = deque()
        self._arrived = anyio.Event()
        client._serve_host_call = self._take  # type: ignore[method-assign]

    async def _take(self, message: dict[str, Any]) -> None:
        self._received.append(message)
        self._arrived.set()

    async def next(self) -> dict[str, Any]:
        """The next `host.call` request (the whole frame), within `WAIT`."""
        with anyio.fail_after(WAIT):
            while not self._received:
                self._arrived = anyio.Event()
                await self._arrived.wait()
        return self._received.popleft()

    def waiting(self) -> int:
        return len(self._received)


async def answer(client: SidecarClient, request_id: Any, result: Any = None, error: Any = None) -> None:
    """An ordinary JSON-RPC response from the host, sent as a raw frame."""
    frame: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
    if error is not None:
        frame["error"] = error
    else:
        frame["result"] = result
    await client.send_frame(json.dumps(frame).encode() + b"\n")


async def until_result(client: SidecarClient, vm_id: str, export: str, expected: Any) -> None:
    """Wait (within `WAIT`) until `export` returns `expected`: async answers land on their own."""
    with anyio.fail_after(WAIT):
        while (await client.request("vm.call", {"vm_id": vm_id, "export": export}))["results"] != [expected]:
            pass


# -- the C guest ------------------------------------------------------------------------------

KV_DIR = GUESTS / "c"


@functools.cache
def kv_wasm() -> bytes:
    return (KV_DIR / "kv.wasm").read_bytes()


def kv_source() -> dict[str, str]:
    return {"wasm_base64": base64.b64encode(kv_wasm()).decode()}


# -- snapshot files ---------------------------------------------------------------------------


# The state `honest_state` describes: a module that declares it this way can be restored from it.
HONEST_STATE = '(memory (export "memory") 1 4) (global (mut i32) (i32.const 0)) (global (mut i64) (i64.const 0))'


def honest_state(wasm: bytes) -> SnapshotState:
    """A state `wasm` could have been snapshotted in (one empty page, two zero globals, declared
    as `HONEST_STATE`), however unfit the module is otherwise."""
    return SnapshotState(
        module_id="sha256:" + hashlib.sha256(wasm).hexdigest(), module=wasm, mode="stateful", limits={}, wasi={},
        memories=[MemoryImage(0, 65536, [])], globals=[GlobalValue(0, "i32", 0), GlobalValue(1, "i64", 0)],
        pending_host_calls=[], next_ticket=0, sidecar_version="test",
    )


def read_state(path: Path) -> SnapshotState:
    return snapshot_file.parse(path.read_bytes())


def write_state(path: Path, state: SnapshotState) -> Path:
    """`state` as a file with a correct header and checksum, however much it lies."""
    path.write_bytes(snapshot_file.encode(state))
    return path


def sealed(body: bytes) -> bytes:
    """`body` in a file with a correct header and checksum, whatever it says."""
    return b"".join(snapshot_file.seal([body]).parts)


def zero_based(state: SnapshotState) -> SnapshotState:
    """`state` as a file before format 3 holds it: each memory's non-zero chunks, its module's image
    (data segments, which must sit at constant offsets) overlaid with the changes the state holds."""
    segments = decode(WasmModule.parse(state.module)).data
    memories = []
    for image in state.memories:
        flat = bytearray(image.size_bytes)
        for segment in segments:
            reader = Reader(segment.offset or b"")
            assert segment.memory == image.index and reader.u8() == 0x41, "a data segment at a constant offset"
            start = reader.s32()
            flat[start : start + len(segment.init)] = segment.init
        for offset, data in image.runs:
            flat[offset : offset + len(data)] = data
        runs = [(offset, bytes(run)) for offset, run in snapshot_file.sparse_runs(memoryview(flat))]
        memories.append(msgspec.structs.replace(image, runs=runs))
    return msgspec.structs.replace(state, baseline=None, memories=memories)


def replace(struct: Any, **changes: Any) -> Any:
    """A copy of a snapshot struct (the state, a memory, a global, a pending call) with changes."""
    return msgspec.structs.replace(struct, **changes)


def hostile_file_guest(*, pages: int, max_pages: int, store_at: int) -> str:
    """The guest hostile snapshot files are made from: a pending async host call, mutable globals of
    three types, and `bump`, which counts in a global and stores the count at `store_at`."""
    return rf"""(module
  (import "sidecar" "host_call_async" (func $hca (param i32 i32 i32 i32) (result i64)))
  (memory (export "memory") {pages} {max_pages})
  (global $n (mut i32) (i32.const 0))
  (global $big (mut i64) (i64.const -5))
  (global $x (mut f64) (f64.const 0.5))
  (data (i32.const 0) "kv.get{{\"k\":1}}")
  (func (export "ask") (result i64) (call $hca (i32.const 0) (i32.const 6) (i32.const 6) (i32.const 7)))
  (func (export "sidecar_on_response") (param i64 i32 i32))
  (func (export "bump") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.store (i32.const {store_at}) (global.get $n))
    (global.get $n)))"""
