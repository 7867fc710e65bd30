"""Correlation of the sidecar's own outbound requests with the host's responses.

Owns request ids, the pending table, the bounded memory of recently completed ids, and the
verdict on every incoming response: delivered to exactly its caller, or dropped as `unmatched`
(never issued), `duplicate` (already answered) or `stale` (abandoned: VM gone, timed out, or
answered so long ago that it was forgotten). Pure and single-threaded: the daemon wraps it in a
lock and does the waiting, timing and logging.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from .envelope import RequestId

DropReason = Literal["unmatched", "duplicate", "stale"]
_ANSWERED = "answered"
_ABANDONED = "abandoned"


class Pending(msgspec.Struct):
    """One outbound request waiting for its answer. `waiter` is whatever the caller waits on."""

    id: str
    owner: str
    method: str
    params: Any
    waiter: Any = None


class Delivered(msgspec.Struct, frozen=True):
    pending: Pending


class Dropped(msgspec.Struct, frozen=True):
    reason: DropReason
    owner: str | None = None


@dataclass
class Correlator:
    """Issues ids `<process token>.<n>` so ids from this process never collide with another's."""

    completed_capacity: int
    # `secrets.token_hex(6)` is this; `secrets` imports hashlib and OpenSSL, ~2 ms of a cold start.
    token: str = field(default_factory=lambda: os.urandom(6).hex())
    _counter: int = 0
    _pending: dict[str, Pending] = field(default_factory=dict)
    _completed: OrderedDict[str, tuple[str, str]] = field(default_factory=OrderedDict)

    def issue(self, owner: str, method: str, params: Any, waiter: Any = None) -> Pending:
        self._counter += 1
        pending = Pending(f"{self.token}.{self._counter}", owner, method, params, waiter)
        self._pending[pending.id] = pending
        return pending

    def adopt(self, pending: Pending) -> bool:
        """Register a call issued by an earlier process (restored from a snapshot) under its id.

        Its id carries the other process's token, which is how ids stay unique across processes.
        False when that id is pending here already (the VM it came from still waits on it).
        """
        if pending.id in self._pending:
            return False
        self._completed.pop(pending.id, None)
        self._pending[pending.id] = pending
        return True

    def resolve(self, response_id: RequestId | None) -> Delivered | Dropped:
        key = response_id if isinstance(response_id, str) else None
        pending = self._pending.pop(key, None) if key is not None else None
        if pending is not None:
            self._remember(pending.id, pending.owner, _ANSWERED)
            return Delivered(pending)
        if key is not None and key in self._completed:
            owner, how = self._completed[key]
            return Dropped("duplicate" if how == _ANSWERED else "stale", owner)
        if key is not None and self._issued_here_and_forgotten(key):
            return Dropped("stale")
        return Dropped("unmatched")

    def abandon(self, request_id: str) -> Pending | None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            self._remember(pending.id, pending.owner, _ABANDONED)
        return pending

    def abandon_owner(self, owner: str) -> list[Pending]:
        gone = [p for p in self._pending.values() if p.owner == owner]
        for pending in gone:
            self.abandon(pending.id)
        return gone

    def pending_of(self, owner: str) -> list[Pending]:
        return [p for p in self._pending.values() if p.owner == owner]

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._pending

    def get(self, request_id: str) -> Pending | None:
        return self._pending.get(request_id)

    def _remember(self, request_id: str, owner: str, how: str) -> None:
        if self.completed_capacity <= 0:
            return
        self._completed[request_id] = (owner, how)
        while len(self._completed) > self.completed_capacity:
            self._completed.popitem(last=False)

    def _issued_here_and_forgotten(self, key: str) -> bool:
        prefix, _, number = key.partition(".")
        return prefix == self.token and number.isdigit() and 0 < int(number) <= self._counter
