"""Shared fixtures: the anyio backend, the transport every contract case runs over, the CPython guest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar import runtimes

from .assets.cpython import cpython_wasm
from .support import installed_python_runtime, memory_session, process_session


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def private_compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One compile cache for the whole run (sidecar subprocesses inherit it), never the user's."""
    saved = os.environ.get("SIDECAR_CACHE_DIR")
    os.environ["SIDECAR_CACHE_DIR"] = str(tmp_path_factory.mktemp("compile-cache"))
    yield
    if saved is None:
        os.environ.pop("SIDECAR_CACHE_DIR", None)
    else:
        os.environ["SIDECAR_CACHE_DIR"] = saved


@pytest.fixture
def own_compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty compile cache for one test (each transport too), for tests that see what is cached."""
    directory = tmp_path / "compile-cache"
    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(directory))
    return directory


@pytest.fixture(params=["memory", "subprocess"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def session(transport: str) -> Any:
    """A factory: `async with session(env=..., host_handler=...) as (client, server_or_None)`."""
    return memory_session if transport == "memory" else process_session


COMPILE_WAIT = 300  # seconds: the one real compile of 20 MB, on a busy 2-core machine


@pytest.fixture(scope="session")
def cpython() -> Path:
    """The module's path, its compiled code already in the session's compile cache.

    A real sidecar compiles it, so the cache entry is whatever the sidecar itself would look
    for (its engine settings and any rewrite it applies at load).
    """
    path = cpython_wasm()
    _warm_the_cache("module.load", {"path": str(path)})
    return path


@pytest.fixture(scope="session")
def python_runtime() -> runtimes.InstalledRuntime:
    """The installed Python runtime, its pre-initialized module already baked and compiled in the
    session's compile cache (the first bake and compile take seconds)."""
    installed = installed_python_runtime()
    _warm_the_cache("vm.create", {"runtime": "python"})
    return installed


def _warm_the_cache(method: str, params: dict[str, Any]) -> None:
    """Make a real sidecar do `method` once, with the session's private compile cache."""
    request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    with subprocess.Popen(
        [sys.executable, "-m", "sidecar"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ),  # the session's private compile cache (above) included
    ) as sidecar:
        assert sidecar.stdin is not None and sidecar.stdout is not None
        watchdog = threading.Timer(COMPILE_WAIT, sidecar.kill)  # a hung sidecar fails the fixture
        watchdog.start()
        sidecar.stdin.write(json.dumps(request).encode() + b"\n")
        sidecar.stdin.flush()
        answer = json.loads(sidecar.stdout.readline())  # stdin stays open: EOF would cancel the work
        sidecar.stdin.close()
        sidecar.wait(COMPILE_WAIT)
        watchdog.cancel()
    assert "result" in answer, answer
