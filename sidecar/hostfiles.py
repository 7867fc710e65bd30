"""Reading a file the host names by path (a module, a snapshot) within a byte bound, writing the
sidecar's own files whole or not at all, and mapping one of them without holding its descriptor.

Owns the one way the sidecar reads such a file, because what sits at a path is not to be trusted:
- it is opened with `O_NONBLOCK`, so a FIFO with no writer cannot block `open` (and the thread
  that serves the request) forever;
- it must be a regular file, judged by `fstat` on the descriptor just opened: a `stat` before the
  `open` would judge whatever was at the path a moment earlier;
- it is read to at most one byte past the bound whatever size it reports: a device (`/dev/zero`)
  or a `/proc` file reports 0 bytes and may never end, and a regular file may grow meanwhile.
Knows nothing about what the bytes are, nor which error a caller answers with.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import tempfile
import weakref
from io import BufferedReader
from pathlib import Path

Buffer = bytes | bytearray | memoryview

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFile(OSError):
    """The path names something that is not a regular file; `strerror` says what it is."""

    def __init__(self, mode: int) -> None:
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        super().__init__(f"not a regular file (it is {kind})")
        self.strerror = str(self)


class TooLarge(Exception):
    """The file holds more than the bound: `size` is its reported size when that is over the
    bound (nothing was read), else the bound plus one (what was read before giving up)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def read_bounded(path: str | Path, capacity: int) -> bytes:
    """The bytes of the regular file at `path`, at most `capacity` of them.

    Raises `NotRegularFile` or another `OSError` when it cannot be read, `TooLarge` past `capacity`.
    """
    file, info = open_bounded(path, capacity)
    with file:
        return read_within(file, info, capacity)


def open_bounded(path: str | Path, capacity: int) -> tuple[BufferedReader, os.stat_result]:
    """The regular file at `path`, open, and its `fstat`, which reports at most `capacity` bytes:
    the first half of `read_bounded`, for a caller that may not need the bytes at all."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(info.st_mode)
        if info.st_size > capacity:
            raise TooLarge(info.st_size)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), info


def read_within(file: BufferedReader, info: os.stat_result, capacity: int) -> bytes:
    """The rest of `file` (from `open_bounded`, `info` its `fstat`), at most `capacity` bytes."""
    # O_NONBLOCK changes nothing for a regular file's reads. One byte past the reported size
    # shows a file that holds more than it says; only then is the rest read, never more than
    # one byte past the bound.
    data = file.read(info.st_size + 1)
    if len(data) > info.st_size:
        data += file.read(capacity + 1 - len(data))
    if len(data) > capacity:
        raise TooLarge(len(data))
    return data


def file_identity(info: os.stat_result) -> tuple[int, int, int, int, int]:
    """The file as any change to it would show: device, inode, size, mtime and ctime (what a
    seal vouches for, and what a read compares before and after)."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def map_readonly(fd: int, length: int) -> memoryview:
    """The first `length` bytes of the open file `fd` as a read-only view of a private mapping,
    unmapped once no view of it is left. Through the C library rather than Python's `mmap`, which
    keeps a duplicate of the descriptor for as long as the mapping lives: a module made from a
    cache entry keeps a view for its life, and a descriptor each would count against the process's
    limit. Pages are read when touched. The file must not shrink meanwhile (a touch past its end is
    SIGBUS, as for the code wasmtime maps from the same file): the sidecar's own files are replaced
    by rename, never rewritten in place."""
    if length == 0:
        return memoryview(b"")
    address = _LIBC.mmap(None, length, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
    if address is None or address == ctypes.c_void_p(-1).value:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    region = (ctypes.c_char * length).from_address(address)
    # Not at exit: a thread still running then may hold a view; the process's end unmaps it anyway.
    weakref.finalize(region, _LIBC.munmap, address, length).atexit = False
    return memoryview(region).cast("B").toreadonly()


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return libc


_LIBC = _libc()


def write_atomically(path: Path, parts: list[Buffer], *, durable: bool = True) -> None:
    """`parts` written to a temporary file in the same directory and renamed over `path`: readers
    never see half a file. `durable`: synced before the rename, so that a crash of the machine
    leaves the old file or the new one whole (a file that dies with the process needs no sync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
