"""Module sources: the bytes a request names (a path, inline bytes, WebAssembly text) and their id.

Owns reading a source within `runner_module_bytes` (a path through `sidecar.hostfiles`), turning
WebAssembly text into a binary with wasmtime's message on failure (`parse`), the content address
(`module_id`, the sha256 of the bytes as given), and the one-line form of a wasmtime error.
Knows nothing about compiling, the module table or the compile cache's entries.

A path's id without reading it. A second process that loads a 20 MB module from the compile cache
spent ~11 ms reading the file and ~13 ms hashing it, more than everything else of the load, only to
learn the id it had learnt before. So whoever hashes a module file leaves a seal in the compile
cache's directory (`CompileCache.seal`, the entries' own mechanism): the file's device, inode, size,
mtime and ctime, the boot, and the digest. A later load whose open file shows exactly that takes the
id from the seal and reads the bytes only if a compile needs them (then checked against the id).

Why the seal can be trusted for a file the sidecar does not own, under the entries' trust model:
- any write to a file sets its ctime to the kernel's clock, and nothing (`os.utime` included) sets
  ctime back: restoring the size and mtime after changing the bytes still shows;
- a rename over the path is another inode; a crash is another boot (pages never written back);
- ctime has the coarse clock's step (plus the filesystem's grain), so a write in the same step as
  the one before the hash could leave ctime as it was: a file is sealed only when its ctime was
  older than that before the read began, and its `fstat` after the read is the one before it.
What it does not catch: a write through a shared mapping to a page that is already dirty (the
kernel updates the times only when a clean page is first written), the disk changing bytes under
the page cache, and the wall clock set back past a file's ctime. Seals exist only where the boot
has an id (Linux) and the cache is on; elsewhere every load of a path hashes it.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import wasmtime
from msgspec import UNSET

from protocol.errors import InvalidModuleError, InvalidParamsError

from .hostfiles import TooLarge, file_identity, open_bounded, read_bounded, read_within
from .limits import Limits

if TYPE_CHECKING:
    from .compile_cache import CompileCache

_SOURCES = ("path", "wasm_base64", "wat")


_CLOCK_REALTIME_COARSE = 5  # Linux's id of the clock file times are stamped with; Python names it not
_SECOND_NS = 1_000_000_000


def content_id(wasm: bytes) -> str:
    """The `module_id` of a module's bytes."""
    return "sha256:" + hashlib.sha256(wasm).hexdigest()


class Source:
    """A module source: its id, its size, and its bytes, which a path whose seal gives the id
    leaves unread until a compile asks for them (`data`)."""

    __slots__ = ("module_id", "size", "_data", "_path", "_limits")

    def __init__(self, module_id: str, size: int, data: bytes | None, path: str = "",
                 limits: Limits | None = None) -> None:
        self.module_id, self.size, self._data, self._path, self._limits = module_id, size, data, path, limits

    @classmethod
    def of(cls, data: bytes) -> Source:
        return cls(content_id(data), len(data), data)

    def data(self) -> bytes:
        """The bytes; read now if they were not, and refused if they are no longer those of the id."""
        if self._data is None:
            with _file_errors(self._path, self._limits):  # type: ignore[arg-type]
                data = read_bounded(self._path, self._limits.runner_module_bytes)  # type: ignore[union-attr]
            if content_id(data) != self.module_id:
                raise InvalidModuleError(f"module {self._path!r} changed while it was loaded: load it again",
                                         stage="read", path=self._path)
            self._data = data
        return self._data


def read_source(params: Any, limits: Limits, seals: CompileCache | None = None) -> Source:
    """The module named by `params` (`path`, `wasm_base64` or `wat`), within `runner_module_bytes`;
    a path is known by its seal in `seals` when it has one."""
    given = [name for name in _SOURCES if getattr(params, name, UNSET) is not UNSET]
    if len(given) != 1:
        raise InvalidParamsError("exactly one of path, wasm_base64, wat names the module", path="$")
    capacity = limits.runner_module_bytes
    if given[0] == "path":
        return _read_path(params.path, limits, seals)
    if given[0] == "wasm_base64":
        data = params.wasm_base64  # msgspec has decoded the base64 already
    else:
        text = params.wat.encode()
        if len(text) > capacity:  # bounds the text parser's work too
            raise limits.exceeded("runner_module_bytes", len(text), module_source="wat")
        try:
            data = bytes(wasmtime.wat2wasm(text))
        except wasmtime.WasmtimeError as exc:
            raise InvalidModuleError(f"invalid WebAssembly text: {error_summary(exc)}", stage="parse") from None
    if len(data) > capacity:
        raise limits.exceeded("runner_module_bytes", len(data), module_source=given[0])
    return Source.of(data)


def _read_path(path: str, limits: Limits, seals: CompileCache | None) -> Source:
    """The file at `path`: by its seal, or read, hashed, and sealed when it has settled (above)."""
    with _file_errors(path, limits):
        file, info = open_bounded(path, limits.runner_module_bytes)
        with file:
            name = hashlib.sha256(f"source:{info.st_dev}:{info.st_ino}".encode()).hexdigest()
            digest = seals.sealed(name, info) if seals else None
            if digest is not None:
                return Source("sha256:" + digest.hex(), info.st_size, None, path, limits)
            began = time.time_ns()
            data = read_within(file, info, limits.runner_module_bytes)
            digest = hashlib.sha256(data).digest()
            if (seals and sealable(info.st_ctime_ns, began)
                    and file_identity(os.fstat(file.fileno())) == file_identity(info)):
                seals.seal(name, info, digest)
    return Source("sha256:" + digest.hex(), len(data), data)


@contextmanager
def _file_errors(path: str, limits: Limits) -> Iterator[None]:
    """A file that cannot be read as a module, as the error that names why."""
    try:
        yield
    except TooLarge as exc:
        raise limits.exceeded("runner_module_bytes", exc.size, path=path) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InvalidModuleError(f"cannot read module {path!r}: {reason}", stage="read", path=path) from None


def sealable(ctime_ns: int, began_ns: int) -> bool:
    """Whether a file whose ctime is `ctime_ns` may be sealed by a read that began at `began_ns`:
    any write after that must change its ctime, for it is older by more than a step of the clock
    file times are stamped with plus the grain they are kept in."""
    return ctime_ns + _COARSE_STEP_NS + _grain_ns(ctime_ns) < began_ns


def _grain_ns(stamp_ns: int) -> int:
    """The coarsest grain `stamp_ns` could have been kept in, judged by its trailing zeros (a
    filesystem that keeps whole seconds may keep two: FAT); a finer time that happens to end in
    zeros only waits longer for its seal."""
    if stamp_ns % _SECOND_NS == 0:
        return 2 * _SECOND_NS
    grain = 1
    while stamp_ns % (grain * 10) == 0:
        grain *= 10
    return grain


def _coarse_step_ns() -> int:
    try:
        return round(time.clock_getres(_CLOCK_REALTIME_COARSE) * _SECOND_NS)
    except OSError:  # not Linux: no boot id there either, so no seal is ever made
        return _SECOND_NS


_COARSE_STEP_NS = _coarse_step_ns()


def error_summary(exc: Exception) -> str:
    """The informative line of a wasmtime message: the root cause of a chain, or the first line
    with its text position."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "Caused by:" in lines:
        return re.sub(r"^\d+: ", "", lines[-1])
    where = next((line[4:] for line in lines if line.startswith("--> ")), None)
    return f"{lines[0]} (at {where})" if where else lines[0]
