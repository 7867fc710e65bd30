"""The `state` snapshot file: a versioned, checksummed, self-describing container of one VM.

Owns the byte layout and every check a file must pass before any of it is believed: snapshot
files are untrusted input (they travel between machines), so a bad magic, version, length,
checksum or shape is refused with -32006 naming the stage that failed. Knows nothing about
wasmtime: it carries bytes and numbers, and `sidecar.snapshots` decides what they mean.

Layout: `MAGIC` (8 bytes), format version (u32 LE), body length (u64 LE), body (msgpack of
`SnapshotState`), checksum (32 bytes): in version 2 the SHA-256 of everything before it, so the
one pass that makes it also gives the file's own SHA-256 (`vm.snapshot` reports it) by hashing on
over the checksum; in version 1, still read, the SHA-256 of the body alone. Memories are stored
sparsely as runs of `SNAPSHOT_CHUNK_BYTES` chunks: in versions 1 and 2, the non-zero ones; in
version 3 (the version 2 container), those that differ from the memory a fresh instance of the
module named by `baseline` starts with (its data segments), so a pre-initialized module's baked
state is not stored again. A file without a baseline is written as version 2, which sidecars
before version 3 read too.

Writing is built for big memories (issue 15): the scan is native, the runs are views into linear
memory that go to the file uncopied (the writer frames them in msgpack itself, byte for byte what
msgspec would write), and the file is hashed once.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from protocol.decoding import compact_json
from protocol.errors import InvalidSnapshotError, ParseError, env_var_for

from .hostfiles import Buffer, TooLarge, read_bounded
from .wasmffi import changed_runs

MAGIC = b"WSIDECAR"
FORMAT_VERSION = 3  # memories diffed against the module's image (`baseline`)
ZERO_BASED_VERSION = 2  # memories diffed against zero: what a file without a baseline is written as
READ_VERSIONS = (1, 2, 3)  # 1: the checksum covers the body only
SNAPSHOT_CHUNK_BYTES = 4096  # invariant of the format: all-zero chunks of this size are not stored
_HEADER = struct.Struct("<8sIQ")
_DIGEST_LENGTH = 32
# msgpack's length headers, each kind's forms smallest first as (lengths below, struct layout,
# code); a layout of None is a fix form, the length or-ed into the code. The writer frames the
# memories itself (see `encode_parts`), and a test holds it to msgspec's bytes.
_MAP = ((16, None, 0x80), (1 << 16, ">BH", 0xDE), (1 << 32, ">BI", 0xDF))
_ARRAY = ((16, None, 0x90), (1 << 16, ">BH", 0xDC), (1 << 32, ">BI", 0xDD))
_BIN = ((1 << 8, ">BB", 0xC4), (1 << 16, ">BH", 0xC5), (1 << 32, ">BI", 0xC6))
# Bytes: a shorter run is copied in with its neighbours, a longer one written from where it lies.
# Not a bound: any value writes the same file.
_GATHER_BELOW = 64 * 1024

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
# The guest ABI hands tickets to the guest as i64 >= 0: a file's ticket past that range would
# fault the host function that issues the next one, or the callback that delivers its answer.
Ticket = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class MemoryImage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Memory `index` of `size_bytes`; `runs` are (offset, bytes) of its non-zero regions (when
    written, views into the linear memory instead of bytes)."""

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
    # changes to; None: changes to zero (versions 1 and 2).
    baseline: str | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SnapshotState)


def sparse_runs(memory: memoryview, baseline: bytes | None = None) -> list[tuple[int, memoryview]]:
    """The chunks of `memory` that differ from `baseline` (zeros when None), adjacent ones merged
    into runs, as views into `memory`: nothing is copied, so the runs are valid only as long as
    `memory` is (for a linear memory: while its VM stays idle). The scan is native (`changed_runs`)."""
    return [(start, memory[start:stop]) for start, stop in changed_runs(memory, SNAPSHOT_CHUNK_BYTES, baseline)]


class _Parts:
    """msgpack written as a list of buffers, byte for byte what msgspec writes: small items are
    gathered into one `bytearray`, and a binary value of `_GATHER_BELOW` bytes or more goes in as it
    is, never copied (a memory's runs, views into linear memory)."""

    def __init__(self) -> None:
        self._buffers: list[Buffer] = []
        self._small = bytearray()

    def header(self, forms: tuple[tuple[int, str | None, int], ...], count: int) -> None:
        """A map, array or bin header for `count` entries or bytes, in the smallest form that holds it."""
        form = next((form for form in forms if count < form[0]), None)
        if form is None:
            raise OverflowError(f"{count} is more than msgpack can frame")
        _, layout, code = form
        self._small += bytes([code | count]) if layout is None else struct.pack(layout, code, count)

    def struct(self, value: msgspec.Struct, framed: str, frame: Callable[[Any], None]) -> None:
        """`value` as msgspec maps it: field `framed` written by `frame`, the others by msgspec."""
        self.header(_MAP, len(value.__struct_fields__))
        for name in value.__struct_fields__:
            self._small += _encoder.encode(name)
            if name == framed:
                frame(getattr(value, name))
            else:
                self._small += _encoder.encode(getattr(value, name))

    def memories(self, images: list[MemoryImage]) -> None:
        self.header(_ARRAY, len(images))
        for image in images:
            self.struct(image, "runs", self.runs)

    def runs(self, runs: list[tuple[int, Buffer]]) -> None:
        self.header(_ARRAY, len(runs))
        for offset, data in runs:
            self.header(_ARRAY, 2)
            self._small += _encoder.encode(offset)
            self.header(_BIN, len(data))
            if len(data) < _GATHER_BELOW:
                self._small += data
            else:
                self._buffers += [self._small, data]
                self._small = bytearray()

    def done(self) -> list[Buffer]:
        return [*self._buffers, self._small]


class Encoded(NamedTuple):
    """A file to write: its buffers in order, and the SHA-256 of all of them (hex)."""

    parts: list[Buffer]
    sha256: str

    @property
    def size(self) -> int:
        return sum(len(part) for part in self.parts)

    @classmethod
    def of(cls, blob: bytes) -> Encoded:
        return cls([blob], hashlib.sha256(blob).hexdigest())


def encode_parts(state: SnapshotState) -> Encoded:
    """The file as buffers to write in order, the memories' runs among them as they were given
    (views into linear memory are not copied), hashed once."""
    parts = _Parts()
    parts.struct(state, "memories", parts.memories)
    return seal(parts.done(), FORMAT_VERSION if state.baseline is not None else ZERO_BASED_VERSION)


def seal(body: list[Buffer], version: int = FORMAT_VERSION) -> Encoded:
    """A body in the container: header, body, checksum of both (one SHA-256 pass over the body)."""
    header = _HEADER.pack(MAGIC, version, sum(len(buffer) for buffer in body))
    digest = hashlib.sha256(header)
    for buffer in body:
        digest.update(buffer)
    checksum = digest.digest()
    digest.update(checksum)  # the file's hash goes on from the checksum's: no second pass
    return Encoded([header, *body, checksum], digest.hexdigest())


def encode(state: SnapshotState) -> bytes:
    return b"".join(encode_parts(state).parts)


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
    if version not in READ_VERSIONS:
        raise InvalidSnapshotError(
            f"snapshot format version {version} is not supported (this sidecar reads "
            f"{', '.join(map(str, READ_VERSIONS))})", stage="version", version=version,
        )
    if _HEADER.size + body_length + _DIGEST_LENGTH != len(blob):
        raise InvalidSnapshotError("snapshot length does not match its header (truncated?)", stage="format")
    body = blob[_HEADER.size : _HEADER.size + body_length]
    checked = body if version == 1 else memoryview(blob)[:-_DIGEST_LENGTH]
    if hashlib.sha256(checked).digest() != blob[-_DIGEST_LENGTH:]:
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
    if (state.baseline is not None) != (version == FORMAT_VERSION):
        raise InvalidSnapshotError(f"a version {version} snapshot {'must' if version == FORMAT_VERSION else 'cannot'} "
                                   "name the module its memories are diffed against", stage="format")
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
