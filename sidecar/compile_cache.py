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

A note `<key>.note` is a small derived fact about a module that is dear to compute (what the
instrumentation found in it: a CPython's code takes ~180 ms to scan), its sha256 over key and
content first; it is never executed, and a note that does not check is a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import structlog
import wasmtime

from .engines import EngineSettings

_CACHE_DIR_ENV = "SIDECAR_CACHE_DIR"
_ENTRY_SUFFIX = ".cwasm"
_NOTE_SUFFIX = ".note"
_TRAILER = struct.Struct("<8sIQQ32s32s")  # magic, format version, module length, extra length, key, sha256
_TRAILER_MAGIC = b"wsidecar"
_FORMAT_VERSION = 1
_DIGEST_BYTES = 32


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

    def read(self, key: str, engine: wasmtime.Engine) -> tuple[wasmtime.Module, bytes] | None:
        """The module and `extra` of a verified entry; None on a miss or a rejected entry."""
        path = self.path(key)
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size <= _TRAILER.size:
                    return _reject(path, "truncated")
                file.seek(size - _TRAILER.size)
                magic, version, module_len, extra_len, entry_key, digest = _TRAILER.unpack(file.read(_TRAILER.size))
                reason = (
                    "not a cache entry" if magic != _TRAILER_MAGIC
                    else f"format version {version}" if version != _FORMAT_VERSION
                    else "foreign key" if entry_key != bytes.fromhex(key)
                    else "length mismatch" if module_len == 0 or module_len + extra_len + _TRAILER.size != size
                    else None
                )
                if reason:
                    return _reject(path, reason)
                # Hashed in place: a 25 MB artifact is not copied to be checked.
                with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
                    if hashlib.sha256(view[: size - _TRAILER.size]).digest() != digest:
                        return _reject(path, "checksum mismatch")
                    extra = bytes(view[module_len : module_len + extra_len])
                # The verified open file, not the path: a concurrent replace cannot swap the bytes between.
                module = wasmtime.Module.deserialize_file(engine, f"/dev/fd/{file.fileno()}")
        except FileNotFoundError:
            return None
        except OSError as exc:
            return _reject(path, f"unreadable: {exc.strerror or exc}")
        except wasmtime.WasmtimeError as exc:  # another wasmtime build or CPU: wasmtime's own check
            return _reject(path, f"incompatible: {str(exc).strip().splitlines()[-1].strip()}")  # the root cause
        with contextlib.suppress(OSError):  # a read-only cache still serves hits
            os.utime(path)  # recently used: evicted last
        return module, extra

    def write(self, key: str, module: wasmtime.Module, extra: bytes = b"") -> None:
        """Store an entry atomically (temp file + rename), then evict down to capacity; failures only log."""
        payload = module.serialize()
        size = len(payload) + len(extra) + _TRAILER.size
        if size > self.capacity:
            _log().info("compile_cache_skipped", key=key, size=size, capacity=self.capacity)
            return
        digest = hashlib.sha256(payload)
        digest.update(extra)
        trailer = _TRAILER.pack(
            _TRAILER_MAGIC, _FORMAT_VERSION, len(payload), len(extra), bytes.fromhex(key), digest.digest()
        )
        if self._write_atomically(self.path(key), payload, extra, trailer):
            self._evict()

    def read_note(self, key: str) -> bytes | None:
        """The content of a note whose checksum matches; None otherwise (a rejected one is logged)."""
        path = self.directory / (key + _NOTE_SUFFIX)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return _reject(path, f"unreadable: {exc.strerror or exc}")
        content = blob[_DIGEST_BYTES:]
        if hashlib.sha256(bytes.fromhex(key) + content).digest() != blob[:_DIGEST_BYTES]:
            return _reject(path, "checksum mismatch")
        return content

    def write_note(self, key: str, content: bytes) -> None:
        """Store a note atomically; failures only log (the fact is computed again next time)."""
        digest = hashlib.sha256(bytes.fromhex(key) + content).digest()
        self._write_atomically(self.directory / (key + _NOTE_SUFFIX), digest, content)

    def _write_atomically(self, path: Path, *parts: bytes) -> bool:
        """A temporary file renamed over `path`, so readers never see half of it; False if that failed."""
        temp = None
        try:
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "wb") as file:
                for part in parts:
                    file.write(part)
            os.replace(temp, path)
        except OSError as exc:
            _log().warning("compile_cache_write_failed", directory=str(self.directory), reason=str(exc))
            if temp is not None:
                Path(temp).unlink(missing_ok=True)
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


def _default_directory() -> Path:
    if override := os.environ.get(_CACHE_DIR_ENV):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "wasm-sidecar"
