"""Shared fixtures: the anyio backend and the transport every contract case runs over."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import memory_session, process_session


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
