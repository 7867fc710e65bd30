"""`restore_pages`, the native half of a rewind, in process: on two private mappings of one file
(as wasmtime maps a module's memory image), only the pages the kernel shows one of them holding
privately are compared, and the ones that differ are copied back from the other."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.wasmffi import restore_pages

PAGE = mmap.PAGESIZE
pytestmark = pytest.mark.skipif(not os.access("/proc/self/pagemap", os.R_OK), reason="no /proc/self/pagemap")


@pytest.fixture
def pagemap() -> Iterator[int]:
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    yield fd
    os.close(fd)


def image(tmp_path: Path, pages: int) -> mmap.mmap:
    """A copy-on-write mapping of a file of `pages` distinct pages, like an instance's memory image."""
    path = tmp_path / "image"
    if not path.exists():
        path.write_bytes(b"".join(bytes([n % 251 + 1]) * PAGE for n in range(pages)))
    with path.open("rb") as file:
        return mmap.mmap(file.fileno(), pages * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def test_only_written_pages_that_differ_are_copied_back(tmp_path: Path, pagemap: int) -> None:
    used, pristine = image(tmp_path, 64), image(tmp_path, 64)
    expected = bytes(pristine)
    assert used[:] == expected  # read, every page: still the file's pages, nothing private
    used[3 * PAGE: 3 * PAGE + 5] = b"dirty"
    used[40 * PAGE: 42 * PAGE] = b"\x00" * (2 * PAGE)
    used[50 * PAGE] = used[50 * PAGE]  # written, private now, but equal: nothing to copy
    assert restore_pages(used, pristine, pagemap) == (3, 4)  # pages copied, pages private
    assert used[:] == expected
    assert restore_pages(used, pristine, pagemap) == (0, 4)  # private still, and equal


def test_misuse_is_a_python_error(tmp_path: Path, pagemap: int) -> None:
    used, pristine = image(tmp_path, 4), image(tmp_path, 4)
    with pytest.raises(ValueError, match="one length"):
        restore_pages(used, memoryview(pristine)[:PAGE], pagemap)
    with pytest.raises(ValueError, match="page-aligned"):
        restore_pages(memoryview(used)[1:PAGE + 1], memoryview(pristine)[1:PAGE + 1], pagemap)
    with pytest.raises(BufferError):
        restore_pages(bytes(PAGE), bytes(PAGE), pagemap)  # not writable
    with pytest.raises(OSError):
        restore_pages(used, pristine, 10_000)  # not an open descriptor
