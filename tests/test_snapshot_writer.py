"""The `state` writer's machinery, in process: the native scan (`changed_runs`), runs as views,
the streamed encoding, the container and the atomic write.

The body stays byte for byte msgspec's msgpack of the state; the container is version 2, and a
version 1 file (written before) is still read. End to end (the real process, a dense memory
restored in another process, a version 1 file restored) is in test_snapshots.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import msgspec
import pytest

from protocol.errors import InvalidSnapshotError
from sidecar import snapshot_file
from sidecar.hostfiles import write_atomically
from sidecar.snapshot_file import MAGIC, SNAPSHOT_CHUNK_BYTES, MemoryImage, SnapshotState
from sidecar.wasmffi import changed_runs

CHUNK = SNAPSHOT_CHUNK_BYTES
MiB = 1 << 20


def memory_with(size: int, writes: dict[int, bytes]) -> bytearray:
    memory = bytearray(size)
    for offset, data in writes.items():
        memory[offset : offset + len(data)] = data
    return memory


# -- the native scan --------------------------------------------------------------------------


@pytest.mark.parametrize(("writes", "expected"), [
    ({}, []),
    ({0: b"\x01"}, [(0, CHUNK)]),
    ({CHUNK - 1: b"\x01\x01"}, [(0, 2 * CHUNK)]),  # a write across a boundary: both chunks, one run
    ({5 * CHUNK + 7: b"x", 7 * CHUNK: b"y"}, [(5 * CHUNK, 6 * CHUNK), (7 * CHUNK, 8 * CHUNK)]),
    ({16 * CHUNK - 1: b"\x80"}, [(15 * CHUNK, 16 * CHUNK)]),  # the last byte of the last chunk
    ({0: b"\xff" * 16 * CHUNK}, [(0, 16 * CHUNK)]),
])
def test_the_scan_finds_the_non_zero_chunks_and_merges_neighbours(writes, expected) -> None:
    assert changed_runs(memory_with(16 * CHUNK, writes), CHUNK) == expected
    assert changed_runs(memory_with(16 * CHUNK, writes), CHUNK, None) == expected


def test_a_partial_last_chunk_and_an_empty_memory() -> None:
    assert changed_runs(memory_with(CHUNK + 10, {CHUNK + 9: b"\x01"}), CHUNK) == [(CHUNK, CHUNK + 10)]
    assert changed_runs(memory_with(CHUNK + 10, {}), CHUNK) == []
    assert changed_runs(b"", CHUNK) == []


def test_against_a_baseline_only_what_differs_from_it_is_a_run() -> None:
    """The baseline is what restore starts from (say, the module's data image); past its end, zeros."""
    baseline = memory_with(4 * CHUNK, {0: b"data", 2 * CHUNK: b"more"})
    memory = memory_with(8 * CHUNK, {0: b"data", 2 * CHUNK: b"MORE", 6 * CHUNK: b"grown"})
    assert changed_runs(memory, CHUNK, bytes(baseline)) == [(2 * CHUNK, 3 * CHUNK), (6 * CHUNK, 7 * CHUNK)]
    # A chunk the baseline has data in and the memory cleared is a change too.
    cleared = memory_with(8 * CHUNK, {2 * CHUNK: b"more"})
    assert changed_runs(cleared, CHUNK, bytes(baseline)) == [(0, CHUNK)]
    # A baseline that ends inside a chunk: its part compared, the rest against zeros.
    assert changed_runs(memory_with(2 * CHUNK, {CHUNK + 5: b"x"}), CHUNK, b"\x00" * (CHUNK + 5) + b"x") == []
    assert changed_runs(memory_with(2 * CHUNK, {CHUNK + 6: b"x"}), CHUNK, b"\x00" * (CHUNK + 5) + b"x") == [
        (CHUNK, 2 * CHUNK)]
    # A baseline longer than the memory: only the memory's length is compared.
    assert changed_runs(memory_with(CHUNK, {}), CHUNK, bytes(4 * CHUNK)) == []


def test_a_run_per_chunk_at_worst() -> None:
    memory = bytearray(b"\x01" * CHUNK + bytes(CHUNK)) * 1000  # every other chunk: 1000 runs
    runs = changed_runs(memory, CHUNK)
    assert len(runs) == 1000 and runs[-1] == (1998 * CHUNK, 1999 * CHUNK)


@pytest.mark.parametrize(("args", "error"), [
    ((bytearray(8), 0), ValueError),
    ((bytearray(8), -1), ValueError),
    ((bytearray(8), "4096"), TypeError),
    (("not a buffer", 4096), TypeError),
    ((bytearray(8), 4096, "not a buffer"), TypeError),
    ((bytearray(8),), TypeError),
    ((bytearray(8), 4096, None, None), TypeError),
])
def test_misuse_of_the_scan_is_a_python_error(args, error) -> None:
    with pytest.raises(error):
        changed_runs(*args)


def test_runs_are_views_into_the_memory_not_copies() -> None:
    memory = memory_with(4 * CHUNK, {CHUNK: b"before"})
    [(offset, run)] = snapshot_file.sparse_runs(memoryview(memory))
    memory[CHUNK : CHUNK + 5] = b"after"
    assert offset == CHUNK and bytes(run[:6]) == b"aftere" and len(run) == CHUNK


# -- the encoding -----------------------------------------------------------------------------


def state_of(memories: list[MemoryImage]) -> SnapshotState:
    module = b"\0asm\1\0\0\0"
    return SnapshotState(
        module_id="sha256:" + hashlib.sha256(module).hexdigest(), module=module, mode="stateful",
        limits={"vm_memory_bytes": 1}, wasi={"args": ["a"], "env": {"K": "V"}}, memories=memories, globals=[],
        pending_host_calls=[], next_ticket=3, sidecar_version="test",
    )


def v1_file(state: SnapshotState) -> bytes:
    """The container as it was always written: header, msgspec's msgpack body, SHA-256 of the body."""
    body = msgspec.msgpack.encode(state)
    return struct.pack("<8sIQ", MAGIC, 1, len(body)) + body + hashlib.sha256(body).digest()


def memories_framing_every_length() -> list[MemoryImage]:
    """Runs whose lengths take each bin header (8, 16, 32-bit), gathered and written apart, and
    counts of runs and memories that take each array header (fix, 16-bit)."""
    sizes = [0, 1, 255, 256, 65535, 65536, 3 * MiB]
    one = MemoryImage(index=0, size_bytes=8 * MiB, runs=[])
    offset = 0
    for size in sizes:
        one.runs.append((offset, memoryview(os.urandom(size))))
        offset += size + CHUNK
    many_runs = MemoryImage(index=1, size_bytes=MiB, runs=[(i * 2, memoryview(b"r")) for i in range(20)])
    return [one, many_runs, *(MemoryImage(index=i, size_bytes=0, runs=[]) for i in range(2, 18))]


def test_the_streamed_body_is_byte_for_byte_msgspecs_and_the_file_is_hashed_once() -> None:
    """What changed is the container (version 2: the checksum covers the header too, so the file's
    own SHA-256 comes from the same pass); the body is what it always was."""
    for memories in ([], [MemoryImage(0, 65536, [])], memories_framing_every_length()):
        state = state_of(memories)
        encoded = snapshot_file.encode_parts(state)
        blob = b"".join(encoded.parts)
        assert blob == snapshot_file.encode(state) and encoded.size == len(blob)
        assert blob[:12] == MAGIC + struct.pack("<I", 2) and blob[20:-32] == msgspec.msgpack.encode(state)
        assert blob[-32:] == hashlib.sha256(blob[:-32]).digest()
        assert encoded.sha256 == hashlib.sha256(blob).hexdigest()
        assert runs_of(snapshot_file.parse(blob)) == runs_of(state)


def test_a_version_1_file_is_still_read() -> None:
    """The compatibility guarantee: a file written before version 2 (checksum of the body alone)."""
    state = state_of(memories_framing_every_length())
    assert runs_of(snapshot_file.parse(v1_file(state))) == runs_of(state)
    v2_header_v1_checksum = v1_file(state)[:8] + struct.pack("<I", 2) + v1_file(state)[12:]
    with pytest.raises(InvalidSnapshotError) as refused:
        snapshot_file.parse(v2_header_v1_checksum)
    assert refused.value.data["stage"] == "checksum"


def runs_of(state: SnapshotState) -> list[list[tuple[int, bytes]]]:
    return [[(offset, bytes(run)) for offset, run in memory.runs] for memory in state.memories]


def test_big_runs_are_handed_on_uncopied_and_small_ones_gathered() -> None:
    big = memoryview(bytearray(b"\x07" * MiB))
    state = state_of([MemoryImage(0, 4 * MiB, [(0, big), (2 * MiB, memoryview(b"small"))])])
    parts = snapshot_file.encode_parts(state).parts
    assert any(part is big for part in parts)
    assert len(parts) == 5  # header, what precedes the big run, the run, what follows, the checksum


# -- the atomic write -------------------------------------------------------------------------


def test_the_write_leaves_the_file_and_no_temporary(tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    target = tmp_path / "a" / "b.state"
    write_atomically(target, [b"head", memoryview(data), bytearray(b"tail")])
    assert target.read_bytes() == b"head" + data + b"tail"
    assert os.listdir(target.parent) == ["b.state"]
    write_atomically(target, [b"again"])  # over an existing file
    assert target.read_bytes() == b"again" and os.listdir(target.parent) == ["b.state"]


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path: Path) -> None:
    not_a_buffer = [0] * 10
    with pytest.raises(TypeError):
        write_atomically(tmp_path / "x.state", [b"fine", os.urandom(MiB), not_a_buffer])
    assert os.listdir(tmp_path) == []
