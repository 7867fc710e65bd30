"""The MCP front's session table: each session's name and its VM's id, kept in the state directory.

Owns `mcp_sessions.json` (see `sidecar.state_dir`'s layout). With a named state directory the
table is written atomically and durably each time a session is made, reset or lost, and read at
start, so sessions outlive the process as their VMs do (hibernation keeps those): a restart on
the same directory brings each session back under its name, with its variables. A table that
cannot be read or fails validation is quarantined like a damaged state file and the server starts
with no session: never fatal. A private directory dies with the process: nothing is written there.

Thread-safe (one lock; a write happens under it, so the file never goes back to an older table).
Knows nothing about VMs beyond their ids.
"""

from __future__ import annotations

import threading
from typing import Literal

import msgspec
import structlog

from protocol.mcp import SessionName
from protocol.methods_vm import VmId

from .hostfiles import TooLarge, read_bounded, write_atomically
from .limits import Limits
from .state_dir import StateDir

log = structlog.get_logger()
TABLE = "mcp_sessions.json"


class _Table(msgspec.Struct, forbid_unknown_fields=True):
    format: Literal[1]
    sessions: dict[SessionName, VmId]


class SessionTable:
    def __init__(self, state_dir: StateDir, limits: Limits) -> None:
        self._dir = state_dir
        self._path = state_dir.path / TABLE
        self._lock = threading.Lock()
        self._names: dict[str, str] = {} if state_dir.private else self._read(limits)

    def __len__(self) -> int:
        with self._lock:
            return len(self._names)

    def vm_ids(self) -> set[str]:
        with self._lock:
            return set(self._names.values())

    def get(self, name: str) -> str | None:
        with self._lock:
            return self._names.get(name)

    def rows(self) -> dict[str, str]:
        with self._lock:
            return dict(self._names)

    def add(self, name: str, vm_id: str) -> None:
        with self._lock:
            self._names[name] = vm_id
            self._save()

    def pop(self, name: str) -> str | None:
        """Forget session `name`; its VM's id, or None when there was no such session."""
        with self._lock:
            vm_id = self._names.pop(name, None)
            if vm_id is not None:
                self._save()
            return vm_id

    def retain(self, live: set[str]) -> None:
        """Forget the sessions whose VM is not among `live` (it did not come back, or is gone)."""
        with self._lock:
            lost = {name: vm_id for name, vm_id in self._names.items() if vm_id not in live}
            for name, vm_id in lost.items():
                del self._names[name]
                log.warning("mcp_session_lost", session=name, vm_id=vm_id)
            if lost:
                self._save()

    def _read(self, limits: Limits) -> dict[str, str]:
        """The table an earlier process left (none: empty); a damaged one is quarantined."""
        try:
            raw = read_bounded(self._path, limits.runner_state_bytes)
            return msgspec.json.decode(raw, type=_Table).sessions
        except FileNotFoundError:
            return {}
        except TooLarge as exc:
            reason = f"larger than runner_state_bytes ({exc.size} bytes)"
        except OSError as exc:
            reason = f"cannot be read: {exc.strerror or exc}"
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            reason = f"is not a session table: {exc}"
        self._dir.set_aside(self._path, f"the MCP session table {reason}", table=TABLE)
        return {}

    def _save(self) -> None:
        """Write the table (under the lock). A failed write is logged: the sessions serve on, and
        are lost at the next start if it never succeeds."""
        if self._dir.private:
            return
        try:
            write_atomically(self._path, [msgspec.json.encode(_Table(format=1, sessions=self._names))])
        except OSError as exc:
            log.error("mcp_sessions_not_saved", path=str(self._path), error=str(exc.strerror or exc))
