"""Sessions for tests: a connected client over either transport.

The contract suite runs every case twice, over an in-memory stream pair (fast, and the test can
reach into the server) and over a real `python -m sidecar` subprocess (the real stdio path).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from protocol.client import HostHandler, SidecarClient
from sidecar import runtimes
from sidecar.app import build_server
from sidecar.limits import load_limits
from sidecar.server import Server

WAIT = 10  # seconds: the ceiling on any single wait in a test, never an expected duration


@asynccontextmanager
async def memory_session(
    env: Mapping[str, str] | None = None, host_handler: HostHandler | None = None
) -> AsyncIterator[tuple[SidecarClient, Server]]:
    """A server in this process, wired to a client through a socket pair (no subprocess)."""
    host_end, sidecar_end = socket.socketpair()
    sidecar_end.setblocking(False)
    server = build_server(sidecar_end.fileno(), sidecar_end.fileno(), load_limits(dict(env or {})))

    async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            await server.run(task_status=task_status)
        finally:
            sidecar_end.shutdown(socket.SHUT_RDWR)  # what the process's exit does to its stdio

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(serve)
            with anyio.fail_after(WAIT):
                await server.services_loaded()  # tests may reach into the server, all of it
            stream = await anyio.abc.SocketStream.from_socket(host_end)
            async with stream, SidecarClient.attach(stream, stream, host_handler) as client:
                yield client, server
                await stream.send_eof()
                with anyio.fail_after(WAIT):
                    await client.closed.wait()
    finally:
        sidecar_end.close()


@asynccontextmanager
async def process_session(
    env: Mapping[str, str] | None = None, host_handler: HostHandler | None = None
) -> AsyncIterator[tuple[SidecarClient, None]]:
    async with SidecarClient.spawn(
        [sys.executable, "-m", "sidecar"], env=env, host_handler=host_handler
    ) as client:
        yield client, None


def installed_python_runtime() -> runtimes.InstalledRuntime:
    """The Python runtime this machine has; without one a test is skipped, except in CI, which
    installs it (`wasm-sidecar runtime install python`): a skip there would hide a broken install."""
    installed = runtimes.find("python")
    if installed is None:
        missing = f"the Python runtime is not installed in {runtimes.install_dir('python')}: " \
                  "run wasm-sidecar runtime install python"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    return installed
