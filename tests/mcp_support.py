"""`wasm-sidecar mcp` for tests: the command, its environment, and a raw line-level peer.

The SDK tests spawn the command through the official MCP client; the wire tests speak to it line
by line, to see what the SDK hides (a response that must not come, a frame no client would send).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.text import TextReceiveStream

from .support import WAIT


def mcp_command() -> list[str]:
    """The installed `wasm-sidecar` script next to this interpreter (what a host registers)."""
    script = Path(sys.executable).with_name("wasm-sidecar")
    found = str(script) if script.exists() else shutil.which("wasm-sidecar")
    assert found, "wasm-sidecar is not installed next to this Python (pip install -e '.[test]')"
    return [found, "mcp"]


def mcp_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables a spawned server needs: the tests' SIDECAR_* (their private compile cache)
    and the user's home (where the runtime is installed). The SDK passes only a safe few itself."""
    keep = {k: v for k, v in os.environ.items() if k.startswith(("SIDECAR_", "XDG_")) or k in ("HOME", "PATH")}
    return {**keep, **(extra or {})}


def initialize(revision: str = "2025-11-25", request_id: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "initialize",
            "params": {"protocolVersion": revision, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}


class RawPeer:
    """Writes frames, reads answers one line at a time."""

    def __init__(self, process: anyio.abc.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._lines = TextReceiveStream(process.stdout)
        self._buffer = ""

    async def send(self, *messages: dict[str, Any] | bytes) -> None:
        for message in messages:
            line = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
            await self._process.stdin.send(line)  # type: ignore[union-attr]

    async def receive(self) -> Any:
        with anyio.fail_after(WAIT):
            while "\n" not in self._buffer:
                self._buffer += await self._lines.receive()
        line, self._buffer = self._buffer.split("\n", 1)
        return json.loads(line)

    async def request(self, message: dict[str, Any]) -> Any:
        await self.send(message)
        return await self.receive()


@asynccontextmanager
async def raw_mcp(env: Mapping[str, str] | None = None) -> AsyncIterator[RawPeer]:
    async with await anyio.open_process(mcp_command(), env=mcp_env(env), stderr=subprocess.DEVNULL) as process:
        yield RawPeer(process)
        await process.stdin.aclose()  # type: ignore[union-attr]
        with anyio.fail_after(WAIT):
            assert await process.wait() == 0
