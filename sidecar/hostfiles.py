"""Reading a file the host names by path (a module, a snapshot) within a byte bound, and
writing the sidecar's own files whole or not at all.

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

import os
import stat
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
    # O_NONBLOCK changes nothing for a regular file's reads. One byte past the reported size
    # shows a file that holds more than it says; only then is the rest read, never more than
    # one byte past the bound.
    with os.fdopen(fd, "rb") as file:
        data = file.read(info.st_size + 1)
        if len(data) > info.st_size:
            data += file.read(capacity + 1 - len(data))
    if len(data) > capacity:
        raise TooLarge(len(data))
    return data


def write_atomically(path: Path, parts: list[Buffer], *, durable: bool = True) -> None:
    """`parts` written to a temporary file in the same directory and renamed over `path`: readers
    never see half a file. `durable`: synced before the rename, so that a crash of the machine
    leaves the old file or the new one whole (a file that dies with the process needs no sync)."""
    import tempfile  # here, not at the top: the daemon imports this module before its first answer

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
