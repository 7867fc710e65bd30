"""The state directory: where hibernated VMs live, one process at a time, within a byte bound.

Owns the directory's layout, its lock, and the bytes it holds. `SIDECAR_STATE_DIR` (or
`--state-dir`) names it; without one, a private directory is made and removed at exit. A named
directory is locked (`flock`, held for the life of the process) so that two sidecars never wake
the same VM; a second one is refused with `StateDirBusy`.

Layout:
- `vms/<vm_id>.state`: one hibernated VM, in the `state` snapshot format (`sidecar.snapshot_file`)
  with its module left out;
- `modules/<hex>.wasm`: each module once, named by its SHA-256, however many VMs of it hibernate
  (10,000 VMs of one module write it once); removed when the last of them is gone. A runtime's
  bake is not stored: a restore makes or finds it from the installation, as for any snapshot;
- `quarantine/`: files that failed validation, moved aside, never read again;
- `trash/`: files on their way out. A VM that wakes renames its file here and the watcher thread
  unlinks it later: on ext4, unlinking a file just written and fsynced costs 0.1-1 ms (freeing its
  blocks goes through the journal), a rename 13 µs, and a wake should not pay for the former;
- `mcp_sessions.json`: under `wasm-sidecar mcp`, its session names and their VMs (`sidecar.mcp_sessions`);
- `lock`: the lock, holding the owner's pid.
- `front`: which front made a named directory (`jsonrpc`, the daemon, or `mcp`); the other is refused.
Every file is written atomically (a temporary file, fsync, rename), so a crash leaves the old file
or the new one, never half of one; temporaries a crash left behind are removed at start. A private
directory dies with the process, so its files skip the fsync: it made a hibernation cost ~1.3 ms
instead of ~0.3, and made removing 3,000 files at exit take 3.1 s on ext4 instead of a tenth.

Thread-safe: the accounting is under one lock; each VM's file is written by one thread at a time
(the hibernation service's rule). Knows nothing about VMs beyond their ids and snapshot states.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.errors import InvalidSnapshotError, RpcError

from . import STATE_DIR_ENV
from .hostfiles import TooLarge, read_bounded, write_atomically
from .limits import Limits
from .logs import log

if TYPE_CHECKING:  # the CLI opens the directory before serving: the cold start must not import wasmtime
    from .snapshot_file import SnapshotState

_SUFFIX = ".state"
_PRIVATE_PREFIX = "wasm-sidecar-state-"


class StateDirBusy(Exception):
    """Another process holds the directory's lock, or the directory is another front's."""


# What each front is called in the refusal of another's directory (`Server.front`).
_FRONTS = {"jsonrpc": "the daemon (wasm-sidecar)", "mcp": "wasm-sidecar mcp"}


class StateFull(Exception):
    """Writing would take the directory past `runner_state_bytes`: `observed` is what it would hold."""

    def __init__(self, observed: int) -> None:
        super().__init__(observed)
        self.observed = observed


@dataclass(frozen=True)
class Found:
    """A hibernated VM found at start: its state (checked) and when it was last used."""

    vm_id: str
    state: SnapshotState
    last_used: float  # wall clock


class StateDir:
    def __init__(self, path: Path | None, limits: Limits, front: str = "jsonrpc") -> None:
        """`path` None: a private directory, removed by `close`. Raises `StateDirBusy`. A named
        directory serves the `front` that made it only: the MCP front removes at start the VMs no
        session names, which would be every VM of the daemon's."""
        self.private = path is None
        if path is None:
            _remove_orphans()
        self.path = Path(tempfile.mkdtemp(prefix=_PRIVATE_PREFIX)) if path is None else path
        self._limits = limits
        for sub in ("vms", "modules", "quarantine", "trash"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._lock_fd)
            raise StateDirBusy(f"the state directory {self.path} is in use by another wasm-sidecar "
                               f"(pid {owner}); give each sidecar its own {STATE_DIR_ENV}") from None
        if path is not None:
            self._claim_for(front)
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        self._mutex = threading.Lock()
        self._sizes: dict[str, int] = {}  # vm_id -> bytes of its state file
        self._module_of: dict[str, str] = {}  # vm_id -> module_id stored apart
        self._refs: dict[str, int] = {}  # module_id -> VMs whose state names it
        self._module_sizes: dict[str, int] = {}
        self.quarantined = 0

    @property
    def bytes(self) -> int:
        with self._mutex:
            return sum(self._sizes.values()) + sum(self._module_sizes.values())

    def scan(self) -> list[Found]:
        """The VMs an earlier process left here, each file checked in full; a file that fails is
        quarantined, never fatal. Leftover temporaries and unreferenced modules are removed."""
        for stray in [*self.path.glob(".*"), *self.path.glob("vms/.*"), *self.path.glob("modules/.*")]:
            stray.unlink(missing_ok=True)
        self.empty_trash()
        found = []
        for path in sorted(self.path.glob(f"vms/*{_SUFFIX}")):
            vm_id = path.name[: -len(_SUFFIX)]
            try:
                state = self.load(vm_id, account=True)
            except InvalidSnapshotError as exc:
                self.quarantine(vm_id, exc)
                continue
            found.append(Found(vm_id, state, path.stat().st_mtime))
        for module in self.path.glob("modules/*.wasm"):
            if "sha256:" + module.stem not in self._refs:
                module.unlink(missing_ok=True)
        return found

    def save(self, vm_id: str, state: SnapshotState, module: bytes | None, last_used: float) -> int:
        """Write a VM's state (its module once, apart: `module`, None for a runtime's bake);
        `StateFull` past `runner_state_bytes`. Returns the bytes it added."""
        from . import snapshot_file  # imported late: see TYPE_CHECKING above

        encoded = snapshot_file.encode_parts(state)
        capacity = self._limits.runner_state_bytes
        with self._mutex:
            new_module = module is not None and state.module_id not in self._refs
            added = encoded.size + (len(module) if new_module and module is not None else 0)
            held = sum(self._sizes.values()) + sum(self._module_sizes.values())
            if held + added > capacity:
                raise StateFull(held + added)
            self._sizes[vm_id] = encoded.size
            if module is not None:
                self._hold_module(vm_id, state.module_id, len(module))
        try:
            if new_module and module is not None:
                write_atomically(self._module_path(state.module_id), [module], durable=not self.private)
            write_atomically(self._state_path(vm_id), encoded.parts, durable=not self.private)
            os.utime(self._state_path(vm_id), (time.time(), last_used))  # what `scan` reads back
        except OSError:
            self.delete(vm_id)
            raise
        return added

    def load(self, vm_id: str, *, account: bool = False) -> SnapshotState:
        """A hibernated VM's state, checked as any snapshot file is (-32006 naming the stage);
        `account`: a file found at start, whose bytes count from now on."""
        from . import snapshot_file

        path = self._state_path(vm_id)
        state = snapshot_file.read(path, self._limits.runner_snapshot_bytes, self._module_bytes)
        if account:
            with self._mutex:
                self._sizes[vm_id] = path.stat().st_size
                if state.runtime is None:
                    self._hold_module(vm_id, state.module_id, self._module_path(state.module_id).stat().st_size)
        return state

    def delete(self, vm_id: str) -> None:
        """Remove a VM's state (it woke, or was disposed), and its module once no VM names it."""
        with self._mutex:
            self._sizes.pop(vm_id, None)
            module_id = self._module_of.pop(vm_id, None)
            orphan = module_id is not None and self._release_module(module_id)
        self._discard(self._state_path(vm_id))
        if orphan and module_id is not None:
            self._discard(self._module_path(module_id))

    def empty_trash(self) -> None:
        """Unlink what `delete` set aside (see `trash/` above); any thread, any time."""
        for path in self.path.glob("trash/*"):
            path.unlink(missing_ok=True)

    def _discard(self, path: Path) -> None:
        try:
            os.replace(path, self.path / "trash" / f"{path.name}.{time.time_ns()}")
        except FileNotFoundError:
            pass

    def quarantine(self, vm_id: str, error: RpcError) -> None:
        """Move a state file that failed validation aside: never read again."""
        self.set_aside(self._state_path(vm_id), error.message, vm_id=vm_id, **error.details)
        self.delete(vm_id)

    def set_aside(self, path: Path, reason: str, **details: Any) -> None:
        """Move a file of this directory that failed validation to `quarantine/` (logged and counted)."""
        target: Path | None = self.path / "quarantine" / f"{path.name}.{time.time_ns()}"
        try:
            os.replace(path, target)
        except OSError:
            target = None  # already gone: nothing left to keep
        with self._mutex:
            self.quarantined += 1
        log.warning("state_quarantined", moved_to=str(target), error=reason, **details)

    def _claim_for(self, front: str) -> None:
        """Mark the directory as `front`'s (the lock is held), or refuse it if another front's."""
        marker = self.path / "front"
        made_by = marker.read_text().strip() if marker.exists() else ""
        if made_by and made_by != front:
            os.close(self._lock_fd)
            raise StateDirBusy(f"the state directory {self.path} holds the VMs of {_FRONTS.get(made_by, made_by)}, "
                               f"so {_FRONTS[front]} cannot use it; give each its own {STATE_DIR_ENV}")
        if not made_by:
            marker.write_text(f"{front}\n")

    def close(self) -> None:
        """Release the lock; a private directory goes with it."""
        if self.private:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.empty_trash()
        os.close(self._lock_fd)

    def _hold_module(self, vm_id: str, module_id: str, size: int) -> None:
        self._module_of[vm_id] = module_id
        self._refs[module_id] = self._refs.get(module_id, 0) + 1
        self._module_sizes[module_id] = size

    def _release_module(self, module_id: str) -> bool:
        """One VM fewer names `module_id`; True when it was the last (the file may go)."""
        self._refs[module_id] -= 1
        if self._refs[module_id]:
            return False
        del self._refs[module_id]
        self._module_sizes.pop(module_id, None)
        return True

    def _module_bytes(self, module_id: str) -> bytes:
        """A stored module, for `snapshot_file.parse` (which checks it against `module_id`)."""
        try:
            return read_bounded(self._module_path(module_id), self._limits.runner_module_bytes)
        except (OSError, TooLarge, ValueError) as exc:
            raise InvalidSnapshotError(f"the state's module {module_id} cannot be read from the state directory "
                                       f"({exc})", stage="module", module_id=module_id) from None

    def _state_path(self, vm_id: str) -> Path:
        return self.path / "vms" / f"{vm_id}{_SUFFIX}"

    def _module_path(self, module_id: str) -> Path:
        digest = module_id.removeprefix("sha256:")
        if not digest.isalnum():  # a name from a file: never a path of its own
            raise ValueError(f"not a module id: {module_id!r}")
        return self.path / "modules" / f"{digest}.wasm"


def _remove_orphans() -> None:
    """Remove the private directories of sidecars that died without removing theirs (a SIGKILL).
    One is an orphan when its lock is free and names a pid that no longer runs: an owner writes
    its pid only once it holds the lock, so a directory still being set up is never taken."""
    for candidate in Path(tempfile.gettempdir()).glob(f"{_PRIVATE_PREFIX}*"):
        try:
            fd = os.open(candidate / "lock", os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if owner.isdigit() and not _running(int(owner)):
                shutil.rmtree(candidate, ignore_errors=True)
                log.info("state_dir_orphan_removed", state_dir=str(candidate), pid=int(owner))
        except OSError:
            pass  # held: its sidecar lives
        finally:
            os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
