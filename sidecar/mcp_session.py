"""The MCP session's state the tools depend on, and `initialize`'s instructions, kept apart from the
tools: the MCP front answers `initialize` from here while the tools' modules (wasmtime underneath)
are still loading (`sidecar.app`)."""

from __future__ import annotations

from protocol.errors import InvalidRequestError

from . import runtimes
from .runtimes import PYTHON

RUNTIME_MISSING = ("The Python runtime is not installed, so run_python fails until it is: run "
                   "`wasm-sidecar runtime install python` where the server runs.")


class McpSession:
    """What the MCP session decided that the tools depend on: the revision, once negotiated."""

    def __init__(self) -> None:
        self.revision: str | None = None

    def require(self) -> str:
        if self.revision is None:
            raise InvalidRequestError("initialize first: no revision is negotiated yet", missing="initialize")
        return self.revision


def instructions() -> str:
    """`initialize`'s instructions: how to use the tools, and whether they can run here at all."""
    text = ("Run Python in WebAssembly sandboxes with run_python: without `session` every call starts a fresh "
            "interpreter; name a `session` to keep variables across calls, and reset_session to start it over. "
            "A sandbox reaches no network, no subprocess and no host file.")
    return text if runtimes.find(PYTHON) is not None else f"{text} {RUNTIME_MISSING}"
