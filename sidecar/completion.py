"""How work on a VM ends, as the VM layer sees it: the interface, and the one for unasked work.

Owns `Completion`, what the VM layer needs of an answer: the dispatcher's reply to a request is
one (it satisfies the protocol structurally; nothing here imports it), and `Delivery` is the one
for work nobody asked for over the wire. Knows nothing about the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import structlog

from protocol.envelope import RequestId
from protocol.errors import RpcError

log = structlog.get_logger()


class Completion(Protocol):
    """How a job's work ends, as the VM layer needs it: one result or one error, whichever comes
    first; a cancel (from elsewhere) ends it too and runs `on_cancel`. The dispatcher's reply to a
    request is one; `Delivery` is the one for work no request asked for."""

    id: RequestId | None  # of the request, if a request asked
    method: str
    done: bool  # ended already (answered or cancelled): work not started need not run
    on_cancel: Callable[[], None] | None

    def result(self, value: Any) -> None: ...

    def error(self, error: RpcError) -> None: ...

    def result_of(self, commit: Callable[[], Any]) -> bool:
        """End with `commit()`'s value, run only if not ended yet, as one step against a cancel."""
        ...


class Delivery:
    """The completion of work nobody asked for over the wire (an async answer's delivery to the
    guest): nobody hears of it, so a failure is logged."""

    id = None
    on_cancel = None

    def __init__(self, vm_id: str, method: str) -> None:
        self._vm_id = vm_id
        self.method = method
        self.done = False

    def result(self, value: Any) -> None:
        self.done = True

    def error(self, error: RpcError) -> None:
        self.done = True
        log.warning("async_delivery_failed", vm_id=self._vm_id, kind=error.kind, error=error.message)

    def result_of(self, commit: Callable[[], Any]) -> bool:
        commit()
        self.done = True
        return True
