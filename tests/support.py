"""Sessions for tests: a connected client over either transport.

The contract suite runs every case twice, over an in-memory stream pair (fast, and the test can
reach into the server) and over a real `python -m sidecar` subprocess (the real stdio path).
"""

from __future__ import annotations

import math
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from protocol.client import HostHandler, SidecarClient
from sidecar.limits import load_limits
from sidecar.server import Server
from sidecar.transport import StreamSink, StreamSource

WAIT = 10  # seconds: the ceiling on any single wait in a test, never an expected duration


@asynccontextmanager
async def memory_session(
    env: Mapping[str, str] | None = None, host_handler: HostHandler | None = None
) -> AsyncIterator[tuple[SidecarClient, Server]]:
    """A server on the event loop of the test, wired to a client through memory streams."""
    to_server, server_in = anyio.create_memory_object_stream[bytes](math.inf)
    server_out, from_server = anyio.create_memory_object_stream[bytes](math.inf)
    server = Server(StreamSource(server_in), StreamSink(server_out), load_limits(dict(env or {})))
    async with anyio.create_task_group() as tg, server_in, from_server:

        async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            async with server_out:
                await server.run(task_status=task_status)

        await tg.start(serve)
        async with SidecarClient.attach(to_server, from_server, host_handler) as client:
            yield client, server
            await to_server.aclose()
            with anyio.fail_after(WAIT):
                await client.closed.wait()


@asynccontextmanager
async def process_session(
    env: Mapping[str, str] | None = None, host_handler: HostHandler | None = None
) -> AsyncIterator[tuple[SidecarClient, None]]:
    async with SidecarClient.spawn(
        [sys.executable, "-m", "sidecar"], env=env, host_handler=host_handler
    ) as client:
        yield client, None


