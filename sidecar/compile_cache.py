"""The on-disk compile cache: wasmtime's compiled code by key, verified before it is trusted.

Owns the cache directory (`cache_dir`, else `SIDECAR_CACHE_DIR`, else `$XDG_CACHE_HOME` or
`~/.cache`, then `wasm-sidecar`), the entry format, atomic writes, and the `runner_cache_bytes`
bound (least recently used first, by mtime; hits touch it). Processes share the directory.
Knows nothing about what a key means beyond `cache_key`, nor about module validity or limits.

An entry `<key>.cwasm` is wasmtime's serialized module, then an opaque `extra` blob (the store
keeps transformed wasm there, so a hit skips the transform), then a trailer: magic, format
version, both lengths, the key, and the sha256 of all before it. A trailer, not a header,
because `Module.deserialize_file` maps the file and wants wasmtime's artifact at offset 0
(CPython: < 1 ms, against ~40 ms for `deserialize` of bytes). Deserializing unchecked bytes is
memory-unsafe, so an entry is mapped only after its trailer and checksum match, through the
same open file; anything else is logged as `compile_cache_rejected` and treated as a miss, and
the caller's rewrite replaces it. A cache that cannot be used logs why and is off; it never
fails a load.

A hit maps the entry rather than reading it: `extra` comes back as a read-only view of the
mapping (`hostfiles.map_readonly`), whose pages are read only if the caller touches them; a CPython's
20 MB of rewritten wasm cost 10-25 ms to read onto fresh pages, and most loads never look at them.

An entry is hashed in full once per file per boot: the process that writes it, or the first that
reads it, sets its mtime to the nanosecond and leaves a seal (a note naming the boot, the file's
device, inode, size, mtime and ctime, and its digest); a later read whose open file matches the
seal checks the trailer but skips the hash, and touches and seals the file again. Seals are notes
any caller may leave for a file it hashed (`seal`, `sealed`); what makes one trustworthy for a
file the sidecar did not write is the caller's to argue (`sidecar.module_sources`). Any write to
the file, in place or by rename, changes what the seal names (the kernel stamps a write with its
coarse clock, never our nanosecond mtime), and a crash invalidates every seal through the boot id
(pages that were never written back); what it does not catch is the disk changing bytes
underneath a file the kernel still has cached.

A note `<key>.note` is a small derived fact about a module that is dear to compute (what the
instrumentation found in it: a CPython's code takes ~180 ms to scan), its sha256 over key and
content first; it is never executed, and a note that does not check is a miss.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
import wasmtime

from .engines import EngineSettings
from .hostfiles import Buffer, file_identity, map_readonly, write_atomically

_CACHE_DIR_ENV = "SIDECAR_CACHE_DIR"
_ENTRY_SUFFIX = ".cwasm"
_NOTE_SUFFIX = ".note"
_TRAILER = struct.Struct("<8sIQQ32s32s")  # magic, format version, module length, extra length, key, sha256
_TRAILER_MAGIC = b"wsidecar"
_FORMAT_VERSION = 1
_DIGEST_LENGTH = 32


def _log() -> Any:
    return structlog.get_logger()  # per event, so a later logging setup still applies


def cache_key(module_id: str, transform_id: str, settings: EngineSettings) -> str:
    """Hex sha256 naming compiled code: the module, the rewrite applied to it, and the engine."""
    return hashlib.sha256(json.dumps([module_id, transform_id, settings.fingerprint()]).encode()).hexdigest()


class CompileCache:
    """Entries in one directory, bounded to `capacity` bytes; thread- and process-safe."""

    def __init__(self, directory: Path, capacity: int) -> None:
        self.directory = directory
        self.capacity = capacity

    @classmethod
    def open(cls, directory: Path | None, capacity: int) -> CompileCache | None:
        """The cache in `directory` (or the default), or None when it is off (capacity 0) or unusable."""
        if capacity == 0:
            return None
        try:
            directory = directory or _default_directory()
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=directory).close()  # writable?
        except (OSError, RuntimeError) as exc:  # RuntimeError: no home directory
            _log().warning("compile_cache_unavailable", directory=str(directory), reason=str(exc))
            return None
        return cls(directory, capacity)

    def path(self, key: str) -> Path:
        return self.directory / (key + _ENTRY_SUFFIX)

    def read(self, key: str, engine: wasmtime.Engine,
             head: int = 0) -> tuple[wasmtime.Module, bytes, memoryview] | None:
        """The module, the first `head` bytes of `extra` and a view of the rest of it (mapped, not
        read), of a verified entry; None on a miss or a rejected entry."""
        path = self.path(key)
        try:
            with open(path, "rb") as file:
                info = os.fstat(file.fileno())
                size = info.st_size
                if size <= _TRAILER.size:
                    return _reject(path, "truncated")
                file.seek(size - _TRAILER.size)
                magic, version, module_len, extra_len, entry_key, digest = _TRAILER.unpack(file.read(_TRAILER.size))
                reason = (
                    "not a cache entry" if magic != _TRAILER_MAGIC
                    else f"format version {version}" if version != _FORMAT_VERSION
                    else "foreign key" if entry_key != bytes.fromhex(key)
                    else "length mismatch" if module_len == 0 or module_len + extra_len + _TRAILER.size != size
                    else "no head" if extra_len < head
                    else None
                )
                if reason:
                    return _reject(path, reason)
                view = map_readonly(file.fileno(), size - _TRAILER.size)
                # Hashed in place: a 25 MB artifact is not copied to be checked.
                if self.sealed(_seal_key(key), info) != digest and hashlib.sha256(view).digest() != digest:
                    return _reject(path, "checksum mismatch")
                # The verified open file, not the path: a concurrent replace cannot swap the bytes between.
                module = wasmtime.Module.deserialize_file(engine, f"/dev/fd/{file.fileno()}")
                with contextlib.suppress(OSError):  # a read-only cache still serves hits, hashing each
                    self._touch_and_seal(key, file.fileno(), digest)  # recently used: evicted last
        except FileNotFoundError:
            return None
        except OSError as exc:
            return _reject(path, f"unreadable: {exc.strerror or exc}")
        except wasmtime.WasmtimeError as exc:  # another wasmtime build or CPU: wasmtime's own check
            return _reject(path, f"incompatible: {str(exc).strip().splitlines()[-1].strip()}")  # the root cause
        return module, bytes(view[module_len : module_len + head]), view[module_len + head :]

    def write(self, key: str, module: wasmtime.Module, extra: Sequence[Buffer] = ()) -> None:
        """Store an entry, `extra` the concatenation of its parts, atomically (temp file + rename),
        then evict down to capacity; failures only log."""
        payload = module.serialize()
        extra_len = sum(len(part) for part in extra)
        size = len(payload) + extra_len + _TRAILER.size
        if size > self.capacity:
            _log().info("compile_cache_skipped", key=key, size=size, capacity=self.capacity)
            return
        digest = hashlib.sha256(payload)
        for part in extra:
            digest.update(part)
        trailer = _TRAILER.pack(
            _TRAILER_MAGIC, _FORMAT_VERSION, len(payload), extra_len, bytes.fromhex(key), digest.digest()
        )
        if self._write_atomically(self.path(key), payload, *extra, trailer):
            with contextlib.suppress(OSError), open(self.path(key), "rb") as file:  # it holds what was just hashed
                self._touch_and_seal(key, file.fileno(), digest.digest())
            self._evict()

    def sealed(self, name: str, info: os.stat_result) -> bytes | None:
        """The digest seal `name` vouches for, if it was left in this boot for this very file as
        `info` shows it (same device, inode, size, and times that a write changes); else None.
        Hashing a 34 MB entry on every hit costs more than the rest of a restore."""
        boot = _boot_id()
        note = self.read_note(name) if boot is not None else None
        state = _file_state(boot, info) if boot is not None else b""
        if note is None or not note.startswith(state) or len(note) != len(state) + 2 * _DIGEST_LENGTH:
            return None
        try:
            return bytes.fromhex(note[len(state) :].decode())
        except ValueError:
            return None

    def seal(self, name: str, info: os.stat_result, digest: bytes) -> None:
        """Leave seal `name`: the file `info` describes was hashed in full, to `digest`, in this boot
        (nothing is sealed where the boot has no id)."""
        if (boot := _boot_id()) is not None:
            self.write_note(name, _file_state(boot, info) + digest.hex().encode())

    def _touch_and_seal(self, key: str, fd: int, digest: bytes) -> None:
        """Mark the file recently used, with an mtime to the nanosecond (a write by anyone gets the
        kernel's coarse clock instead), and seal it as it is now."""
        now = time.time_ns()
        os.utime(fd, ns=(now, now))
        self.seal(_seal_key(key), os.fstat(fd), digest)

    def read_note(self, key: str) -> bytes | None:
        """The content of a note whose checksum matches; None otherwise (a rejected one is logged)."""
        path = self.directory / (key + _NOTE_SUFFIX)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return _reject(path, f"unreadable: {exc.strerror or exc}")
        content = blob[_DIGEST_LENGTH:]
        if hashlib.sha256(bytes.fromhex(key) + content).digest() != blob[:_DIGEST_LENGTH]:
            return _reject(path, "checksum mismatch")
        return content

    def write_note(self, key: str, content: bytes) -> None:
        """Store a note atomically; failures only log (the fact is computed again next time)."""
        digest = hashlib.sha256(bytes.fromhex(key) + content).digest()
        self._write_atomically(self.directory / (key + _NOTE_SUFFIX), digest, content)

    def _write_atomically(self, path: Path, *parts: bytes) -> bool:
        """`parts` as the whole of `path` or not at all (False, logged): readers never see half an
        entry. Not synced: an entry a crash damaged fails its check and is compiled again."""
        try:
            write_atomically(path, list(parts), durable=False)
        except OSError as exc:
            _log().warning("compile_cache_write_failed", directory=str(self.directory), reason=str(exc))
            return False
        return True

    def _evict(self) -> None:
        """Least recently used first; another process may be evicting too, so vanished files are fine."""
        entries = []
        for path in [*self.directory.glob("*" + _ENTRY_SUFFIX), *self.directory.glob("*" + _NOTE_SUFFIX)]:
            with contextlib.suppress(OSError):
                info = path.stat()
                entries.append((info.st_mtime_ns, path.name, info.st_size, path))
        total = sum(entry[2] for entry in entries)
        for _, _, size, path in sorted(entries):
            if total <= self.capacity:
                break
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
                total -= size
                _log().info("compile_cache_evicted", path=str(path), size=size)


def _reject(path: Path, reason: str) -> None:
    _log().warning("compile_cache_rejected", path=str(path), reason=reason)


def _seal_key(key: str) -> str:
    return hashlib.sha256(b"sealed:" + bytes.fromhex(key)).hexdigest()


def _file_state(boot: str, info: os.stat_result) -> bytes:
    """What a seal names besides the digest: the boot, and the file as any change to it would show."""
    return f"{boot} {' '.join(map(str, file_identity(info)))} ".encode()


@functools.cache
def _boot_id() -> str | None:
    """This boot's id (Linux): a seal made before a crash does not vouch for what the disk kept
    of a file whose pages were not yet written back. Elsewhere nothing is sealed: every hit hashes."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _default_directory() -> Path:
    if override := os.environ.get(_CACHE_DIR_ENV):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "wasm-sidecar"
