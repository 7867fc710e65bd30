"""The `state` snapshot file: a versioned, checksummed, self-describing container of one VM.

Owns the byte layout and every check a file must pass before any of it is believed: snapshot
files are untrusted input (they travel between machines), so a bad magic, version, length,
checksum or shape is refused with -32006 naming the stage that failed. Knows nothing about
wasmtime: it carries bytes and numbers, and `sidecar.snapshots` decides what they mean.

Layout: `MAGIC` (8 bytes), format version (u32 LE), body length (u64 LE), body (msgpack of
`SnapshotState`), SHA-256 of the body (32 bytes). Memories are stored sparsely as runs of
non-zero `SNAPSHOT_CHUNK_BYTES` chunks, so zero pages cost nothing.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from protocol.decoding import compact_json
from protocol.errors import InvalidSnapshotError, ParseError, env_var_for

from .hostfiles import TooLarge, read_bounded

MAGIC = b"WSIDECAR"
FORMAT_VERSION = 1
SNAPSHOT_CHUNK_BYTES = 4096  # invariant of the format: all-zero chunks of this size are not stored
_HEADER = struct.Struct("<8sIQ")
_DIGEST_LENGTH = 32
_ZERO_CHUNK = bytes(SNAPSHOT_CHUNK_BYTES)

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
# The guest ABI hands tickets to the guest as i64 >= 0: a file's ticket past that range would
# fault the host function that issues the next one, or the callback that delivers its answer.
Ticket = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class MemoryImage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Memory `index` of `size_bytes`; `runs` are (offset, bytes) of its non-zero regions."""

    index: NonNegative
    size_bytes: NonNegative
    runs: list[tuple[NonNegative, bytes]]


class GlobalValue(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    index: NonNegative
    valtype: Literal["i32", "i64", "f32", "f64"]
    value: int | float


class PendingCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An async host call the VM waits on: answered later under the same `id`, in any process."""

    id: str
    ticket: Ticket
    method: str
    params: bytes  # compact JSON text, as the guest sent it


class SnapshotState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    module_id: str
    module: bytes
    mode: Literal["stateful", "stateless"]
    limits: dict[str, int]
    wasi: dict[str, Any]
    memories: list[MemoryImage]
    globals: list[GlobalValue]
    pending_host_calls: list[PendingCall]
    next_ticket: Ticket
    sidecar_version: str
    # A runtime VM's: its files come from this sidecar's installation, never from the file; only a
    # name this sidecar knows decodes (a path-like name must not pick a directory to preopen).
    runtime: Literal["python"] | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SnapshotState)


def sparse_runs(data: bytes) -> list[tuple[int, bytes]]:
    """The non-zero chunks of `data`, adjacent ones merged into runs.

    Slices of `bytes` compare with memcmp; memoryview slices would compare item by item, which
    made a 64 MiB scan take 200 ms instead of 13.
    """
    runs: list[tuple[int, bytes]] = []
    start: int | None = None
    for offset in range(0, len(data), SNAPSHOT_CHUNK_BYTES):
        chunk = data[offset : offset + SNAPSHOT_CHUNK_BYTES]
        zero = chunk == _ZERO_CHUNK[: len(chunk)]
        if zero and start is not None:
            runs.append((start, data[start:offset]))
            start = None
        elif not zero and start is None:
            start = offset
    if start is not None:
        runs.append((start, data[start:]))
    return runs


def encode(state: SnapshotState) -> bytes:
    body = _encoder.encode(state)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(body)) + body + hashlib.sha256(body).digest()


def write_atomically(path: Path, blob: bytes, *, durable: bool = True) -> None:
    """A temporary file in the same directory renamed over `path`: readers never see half a file.
    `durable`: flushed to the disk before the rename, so that a crash of the machine leaves the old
    file or the new one whole (a file that dies with the process needs no fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


ModuleSource = Callable[[str], bytes]  # a module's bytes by its module_id, from where the caller keeps them


def read(path: Path, capacity: int, module_of: ModuleSource | None = None) -> SnapshotState:
    """Read and check a snapshot file; any problem is -32006 with the failing `stage`.
    `module_of`: where a file that names its module without embedding it finds it (see `parse`)."""
    try:
        blob = read_bounded(path, capacity)
    except TooLarge as exc:
        raise InvalidSnapshotError(
            f"snapshot {str(path)!r} holds more than runner_snapshot_bytes ({capacity} bytes; "
            f"raise with {env_var_for('runner_snapshot_bytes')})",
            stage="bounds", limit="runner_snapshot_bytes", capacity=capacity, observed=exc.size,
        ) from None
    except OSError as exc:
        raise InvalidSnapshotError(f"cannot read snapshot {str(path)!r}: {exc.strerror or exc}", stage="read",
                                   path=str(path)) from None
    return parse(blob, module_of)


def parse(blob: bytes, module_of: ModuleSource | None = None) -> SnapshotState:
    """The file's state, checked. A module left out of the file is a runtime's bake (which the
    restore finds), or, given `module_of`, one kept apart (the state directory keeps each module
    once, however many VMs of it hibernate): it is read there and checked against `module_id`."""
    if len(blob) < _HEADER.size + _DIGEST_LENGTH:
        raise InvalidSnapshotError("file too short to be a snapshot", stage="format", size=len(blob))
    magic, version, body_length = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise InvalidSnapshotError("not a wasm-sidecar snapshot (bad magic)", stage="format")
    if version != FORMAT_VERSION:
        raise InvalidSnapshotError(
            f"snapshot format version {version} is not supported (this sidecar reads {FORMAT_VERSION})",
            stage="version", version=version,
        )
    if _HEADER.size + body_length + _DIGEST_LENGTH != len(blob):
        raise InvalidSnapshotError("snapshot length does not match its header (truncated?)", stage="format")
    body = blob[_HEADER.size : _HEADER.size + body_length]
    if hashlib.sha256(body).digest() != blob[-_DIGEST_LENGTH:]:
        raise InvalidSnapshotError("snapshot checksum mismatch (corrupted)", stage="checksum")
    try:
        state = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidSnapshotError(f"snapshot body is malformed: {exc}", stage="format") from None
    except RecursionError:  # `wasi`, say, nested deeper than the decoder can follow
        raise InvalidSnapshotError("snapshot body is nested too deeply to decode", stage="format") from None
    if not state.module and state.runtime is None and module_of is not None:
        state = msgspec.structs.replace(state, module=module_of(state.module_id))
    # A runtime VM's module is its runtime's bake, named by `module_id` alone (the restore makes or
    # finds it and checks that id); any other module is embedded.
    by_reference = state.runtime is not None and not state.module
    if not by_reference and "sha256:" + hashlib.sha256(state.module).hexdigest() != state.module_id:
        raise InvalidSnapshotError("embedded module does not match its module_id", stage="module")
    _check_consistent(state)
    return state


def _check_consistent(state: SnapshotState) -> None:
    """What the checksum cannot vouch for: a file written by someone else may lie consistently."""
    if state.mode != "stateful":
        raise InvalidSnapshotError("only stateful VMs are snapshotted", stage="format", mode=state.mode)
    for kind, indices in (("memory", [m.index for m in state.memories]), ("global", [g.index for g in state.globals])):
        if len(set(indices)) != len(indices):
            raise InvalidSnapshotError(f"a {kind} appears twice", stage="format")
    for memory in state.memories:
        for offset, data in memory.runs:
            if offset + len(data) > memory.size_bytes:
                raise InvalidSnapshotError(
                    f"memory {memory.index} has data past its size", stage="bounds", memory=memory.index
                )
    tickets = [call.ticket for call in state.pending_host_calls]
    ids = [call.id for call in state.pending_host_calls]
    if len(set(tickets)) != len(tickets) or len(set(ids)) != len(ids):
        raise InvalidSnapshotError("a pending host call appears twice", stage="format")
    if any(ticket >= state.next_ticket for ticket in tickets):
        raise InvalidSnapshotError("a pending host call has a ticket never issued", stage="format")
    for call in state.pending_host_calls:
        # These go to the host verbatim: anything but one compact JSON value (UTF-8, nested no
        # deeper than a decoder follows) would break the channel.
        try:
            compact = compact_json(call.params)
        except ParseError:
            compact = None
        if compact != call.params:
            raise InvalidSnapshotError("a pending host call's params are not compact JSON", stage="format", id=call.id)
