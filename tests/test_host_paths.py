"""Paths the host names (`module.load`, `vm.create`, `vm.restore`): what sits there is not trusted.

A path may name a device that never ends (`/dev/zero`), a FIFO nobody writes (whose `open` would
block the serving thread forever), a directory, or a regular file that holds more than it reports
(`/proc` files report 0 bytes). Each is refused without reading more than the method's byte bound,
and the sidecar serves on.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .guests import refused, rpc

pytestmark = pytest.mark.anyio

# method -> (params naming `path`, the error code of an unusable file)
METHODS = {
    "vm.restore": (lambda path: {"path": path}, -32006),
    "module.load": (lambda path: {"path": path}, -32005),
    "vm.create": (lambda path: {"path": path}, -32005),
}


def _special(kind: str, tmp_path: Path) -> str:
    if kind == "fifo":
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)  # no writer ever opens it
        return str(fifo)
    return {"dev-zero": "/dev/zero", "directory": str(tmp_path)}[kind]


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory"])
@pytest.mark.parametrize("method", list(METHODS))
async def test_a_path_that_is_not_a_regular_file_is_refused_before_reading(session, tmp_path, method,
                                                                           kind) -> None:
    params, code = METHODS[method]
    path = _special(kind, tmp_path)
    async with session() as (client, _):
        error = await refused(client, method, params(path), code=code)
        assert error.data["stage"] == "read" and error.data["path"] == path, error.data
        assert path in error.message and "not a regular file" in error.message, error.message
        assert (await rpc(client, "vm.list"))["vms"] == []
        assert await rpc(client, "ping") == {}


# `/proc/self/maps` of a process that loaded wasmtime: a regular file that reports 0 bytes and
# holds tens of KiB, far past the smallest bound either limit allows.
PROC_FILE = "/proc/self/maps"
SMALL = {"SIDECAR_RUNNER_SNAPSHOT_BYTES": "1 KiB", "SIDECAR_RUNNER_MODULE_BYTES": "1 KiB"}


async def test_a_snapshot_that_holds_more_than_it_reports_is_read_only_to_the_bound(session) -> None:
    async with session(env=SMALL) as (client, _):
        error = await refused(client, "vm.restore", {"path": PROC_FILE}, code=-32006)
        assert error.data["stage"] == "bounds" and error.data["limit"] == "runner_snapshot_bytes", error.data
        assert error.data["capacity"] == 1024 and error.data["observed"] == 1025
        assert "runner_snapshot_bytes" in error.message
        assert await rpc(client, "ping") == {}


@pytest.mark.parametrize("method", ["module.load", "vm.create"])
async def test_a_module_that_holds_more_than_it_reports_is_read_only_to_the_bound(session, method) -> None:
    async with session(env=SMALL) as (client, _):
        error = await refused(client, method, {"path": PROC_FILE}, code=-32002)
        assert error.data["limit"] == "runner_module_bytes", error.data
        assert error.data["capacity"] == 1024 and error.data["observed"] == 1025
        assert await rpc(client, "ping") == {}
