"""Shared fixtures: the anyio backend and the transport every contract case runs over."""

from __future__ import annotations

from typing import Any

import pytest

from .support import memory_session, process_session


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "subprocess"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def session(transport: str) -> Any:
    """A factory: `async with session(env=..., host_handler=...) as (client, server_or_None)`."""
    return memory_session if transport == "memory" else process_session
