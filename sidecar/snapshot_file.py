"""The `state` snapshot file: a versioned, checksummed, self-describing container of one VM.

Owns the byte layout and every check a file must pass before any of it is believed: snapshot
files are untrusted input (they travel between machines), so a bad magic, version, length,
checksum or shape is refused with -32006 naming the stage that failed. Knows nothing about
wasmtime: it carries bytes and numbers, and `sidecar.snapshots` decides what they mean.

Layout: `MAGIC` (8 bytes), format version (u32 LE), body length (u64 LE), body (msgpack of
`SnapshotState`), SHA-256 of the body (32 bytes). Memories are stored sparsely as runs of
`SNAPSHOT_CHUNK_BYTES` chunks: in version 1, the non-zero ones; in version 2, those that differ
from the memory a fresh instance of the module named by `baseline` starts with (its data
segments), so a pre-initialized module's baked state is not stored again. A file without a
baseline is written as version 1, which sidecars before version 2 read too.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from protocol.decoding import compact_json
from protocol.errors import InvalidSnapshotError, ParseError, env_var_for

from .hostfiles import TooLarge, read_bounded

MAGIC = b"WSIDECAR"
FORMAT_VERSION = 2  # the newest this sidecar reads and writes
_ZERO_BASED_VERSION = 1  # memories diffed against zero: what a file without a baseline is written as
SNAPSHOT_CHUNK_BYTES = 4096  # invariant of the format: all-zero chunks of this size are not stored
_HEADER = struct.Struct("<8sIQ")
_DIGEST_LENGTH = 32
_SCAN_BLOCK = 16 * SNAPSHOT_CHUNK_BYTES
_ZERO_BLOCK = bytes(_SCAN_BLOCK)

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
    # The module (its `module_id`, the only one allowed) whose fresh instance's memory the runs are
    # changes to; None: changes to zero (version 1).
    baseline: str | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SnapshotState)


def sparse_runs(data: bytes, baseline: bytes = b"") -> list[tuple[int, bytes]]:
    """The chunks of `data` that differ from `baseline` (zero past its end; by default, the
    non-zero chunks), adjacent ones merged into runs.

    Compared a block of chunks at a time first: most of a baked interpreter's memory is as the
    bake left it, and one comparison of 64 KiB costs about what one of 4 KiB does in Python.
    Slices of `bytes` compare with memcmp; memoryview slices would compare item by item, which
    made a 64 MiB scan take 200 ms instead of 13.
    """
    runs: list[tuple[int, bytes]] = []
    start: int | None = None
    for offset in range(0, len(data), _SCAN_BLOCK):
        end = min(offset + _SCAN_BLOCK, len(data))
        if data[offset:end] == _padded(baseline, offset, end):
            if start is not None:
                runs.append((start, data[start:offset]))
                start = None
            continue
        for chunk in range(offset, end, SNAPSHOT_CHUNK_BYTES):
            stop = min(chunk + SNAPSHOT_CHUNK_BYTES, end)
            same = data[chunk:stop] == _padded(baseline, chunk, stop)
            if same and start is not None:
                runs.append((start, data[start:chunk]))
                start = None
            elif not same and start is None:
                start = chunk
    if start is not None:
        runs.append((start, data[start:]))
    return runs


def _padded(baseline: bytes, start: int, end: int) -> bytes:
    """`baseline[start:end]`, zeros where it ends before `end`."""
    if end <= len(baseline):
        return baseline[start:end]
    if start >= len(baseline):
        return _ZERO_BLOCK[: end - start]  # a whole block: the block itself, not a copy
    return baseline[start:] + _ZERO_BLOCK[: end - len(baseline)]


def encode(state: SnapshotState) -> bytes:
    body = _encoder.encode(state)
    version = FORMAT_VERSION if state.baseline is not None else _ZERO_BASED_VERSION
    return _HEADER.pack(MAGIC, version, len(body)) + body + hashlib.sha256(body).digest()


def write_atomically(path: Path, blob: bytes) -> None:
    """A temporary file in the same directory renamed over `path`: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read(path: Path, capacity: int) -> SnapshotState:
    """Read and check a snapshot file; any problem is -32006 with the failing `stage`."""
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
    return parse(blob)


def parse(blob: bytes) -> SnapshotState:
    if len(blob) < _HEADER.size + _DIGEST_LENGTH:
        raise InvalidSnapshotError("file too short to be a snapshot", stage="format", size=len(blob))
    magic, version, body_length = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise InvalidSnapshotError("not a wasm-sidecar snapshot (bad magic)", stage="format")
    if version not in (_ZERO_BASED_VERSION, FORMAT_VERSION):
        raise InvalidSnapshotError(
            f"snapshot format version {version} is not supported (this sidecar reads "
            f"{_ZERO_BASED_VERSION} to {FORMAT_VERSION})", stage="version", version=version,
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
    # A runtime VM's module is its runtime's bake, named by `module_id` alone (the restore makes or
    # finds it and checks that id); any other module is embedded.
    by_reference = state.runtime is not None and not state.module
    if not by_reference and "sha256:" + hashlib.sha256(state.module).hexdigest() != state.module_id:
        raise InvalidSnapshotError("embedded module does not match its module_id", stage="module")
    if (state.baseline is not None) != (version == FORMAT_VERSION):
        raise InvalidSnapshotError(f"a version {version} snapshot {'must' if version > 1 else 'cannot'} name "
                                   "the module its memories are diffed against", stage="format")
    if state.baseline not in (None, state.module_id):
        raise InvalidSnapshotError("the memories are diffed against another module than the snapshot's",
                                   stage="module", baseline=state.baseline, module_id=state.module_id)
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
