"""A state file stores a memory as changes to the image its module starts with (format version 3).

Through the real process: a module whose data segments fill two chunks, one of which the guest
wipes. The file holds the wiped chunk (zeros are a change too) and the new data, not the chunk
the guest left alone; a restore in another process sees all three as they were. A file in the
format before it (versions 1 and 2: non-zero chunks, diffed against zero) still restores exactly, the
module's data segments not showing through where that state had zeros.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar import snapshot_file
from sidecar.snapshot_file import SNAPSHOT_CHUNK_BYTES

from .guests import call, rpc
from .snapshot_support import read_state, restore, snapshot, write_state, zero_based
from .support import process_session

pytestmark = pytest.mark.anyio
CHUNK = SNAPSHOT_CHUNK_BYTES
FILLED = 0x41414141  # what the data segment puts in every word of the first two chunks

IMAGE = f"""(module
  (memory (export "memory") 1)
  (data (i32.const 0) "{'A' * 2 * CHUNK}")
  (func (export "wipe") (memory.fill (i32.const 0) (i32.const 0) (i32.const {CHUNK})))
  (func (export "poke") (param i32 i32) (i32.store (local.get 0) (local.get 1)))
  (func (export "peek") (param i32) (result i32) (i32.load (local.get 0))))"""


async def peeks(client, vm_id: str) -> list[int]:
    return [(await call(client, vm_id, "peek", address))["results"][0] for address in (0, CHUNK, 2 * CHUNK)]


async def snapshotted(client, path: Path) -> None:
    """A VM of `IMAGE` with its first chunk wiped and 7 written into its third, snapshotted to `path`."""
    vm_id = (await rpc(client, "vm.create", {"wat": IMAGE}))["vm_id"]
    await call(client, vm_id, "wipe")
    await call(client, vm_id, "poke", 2 * CHUNK, 7)
    assert await peeks(client, vm_id) == [0, FILLED, 7]
    await snapshot(client, vm_id, path)


async def test_a_state_file_holds_what_differs_from_the_modules_image(tmp_path: Path) -> None:
    path = tmp_path / "diffed.state"
    async with process_session() as (client, _):
        await snapshotted(client, path)
    state = read_state(path)
    assert state.baseline == state.module_id
    [memory] = state.memories
    assert [(offset, len(data)) for offset, data in memory.runs] == [(0, CHUNK), (2 * CHUNK, CHUNK)]
    assert memory.runs[0][1] == bytes(CHUNK)  # the wiped chunk: zeros differ from the image
    async with process_session() as (client, _):
        restored = (await restore(client, path))["vm_id"]
        assert await peeks(client, restored) == [0, FILLED, 7]


async def test_a_file_of_the_format_before_restores_as_that_format_meant(tmp_path: Path) -> None:
    """Version 2 (or 1), as sidecars before the baseline wrote it: only non-zero chunks, against zero."""
    path = tmp_path / "diffed.state"
    async with process_session() as (client, _):
        await snapshotted(client, path)
        old = zero_based(read_state(path))
        assert [offset for offset, _ in old.memories[0].runs] == [CHUNK]  # chunks 1 and 2, one run
        old_path = write_state(tmp_path / "old.state", old)
        assert old_path.read_bytes()[8:12] == snapshot_file.ZERO_BASED_VERSION.to_bytes(4, "little")
        restored = (await restore(client, old_path))["vm_id"]
        assert await peeks(client, restored) == [0, FILLED, 7]  # the module's data gone where the state had zeros
