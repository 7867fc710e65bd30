"""wasmtime engines, one per distinct engine setting and at most `runner_engines` of them, and
the epoch ticker that drives deadlines.

Owns the engine-level configuration every guest runs under (epoch interruption always on,
fuel metering and the wasm stack cap as chosen per `EngineSettings`, cranelift), the
fingerprint that names a configuration in compile-cache keys, the single ticker thread
that advances the epoch of every engine (native: it never takes the GIL), and how long an engine
lives. Knows nothing about modules, stores or VMs: callers set each store's epoch deadline in
ticks of `runner_epoch_tick_ms` and decide what a trap means.

Why per-settings engines: `consume_fuel` and `max_wasm_stack` cannot differ per store and a
`Module` belongs to one engine, so a VM with other settings needs another engine (and another
compile or cache entry). Each engine costs a compile of every module it runs and a place on the
ticker, so a host passing many distinct settings must not grow them without bound.

Lifetime rule: an engine is in use while an `EngineLease` on it is held. A request holds one
from obtaining a module for the engine until its VM holds its own (so the engine cannot change
in between), and a VM holds one until it is disposed and its last store is closed (a store whose
engine is no longer ticked never reaches its deadline: its guest could run forever). An engine
nobody holds stays until a new setting needs its slot; then the least recently used such engine
is taken off the ticker and dropped, and the `on_evicted` listeners (the module store) forget
what they compiled for it. When every slot is held, the new setting is refused (-32002).
Compiled code belongs to one engine object, not to its settings: wasmtime aborts the process
when a module meets a store of another engine, even one configured the same.
"""

from __future__ import annotations

import platform
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import wasmtime

from .limits import Limits
from .wasmffi.capi import address
from .wasmffi.native import EpochTicker


def _wasmtime_version() -> str:
    """The installed wasmtime-py's version, as `importlib.metadata.version` gives it, read from the
    one dist-info beside the package: importing importlib.metadata (email, zipfile, csv) would cost
    ~35 ms of every cold start. Anything unusual (no dist-info, several) asks importlib.metadata."""
    found = list(Path(wasmtime.__file__).parent.parent.glob("wasmtime-*.dist-info/METADATA"))
    if len(found) == 1:
        with found[0].open(encoding="utf-8") as metadata:
            for line in metadata:
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
                if not line.strip():  # the headers end here
                    break
    from importlib.metadata import version

    return version("wasmtime")


_WASMTIME_VERSION = _wasmtime_version()
_STRATEGY = "cranelift"


@dataclass(frozen=True)
class EngineSettings:
    """What an engine is configured with beyond the fixed parts; one engine per distinct value."""

    fuel: bool
    stack_bytes: int

    @classmethod
    def from_limits(cls, limits: Limits) -> EngineSettings:
        """The settings a VM with these (possibly tightened) limits needs: fuel only when metered."""
        return cls(fuel=limits.vm_fuel != 0, stack_bytes=limits.vm_stack_bytes)

    def fingerprint(self) -> str:
        """Stable text naming everything a serialized module depends on: it loads only into an
        engine of the same wasmtime version, configuration and host."""
        return (
            f"wasmtime={_WASMTIME_VERSION};platform={sys.platform};arch={platform.machine()};"
            f"strategy={_STRATEGY};epoch=1;fuel={int(self.fuel)};stack_bytes={self.stack_bytes}"
        )


@dataclass(eq=False)
class _Entry:
    settings: EngineSettings
    engine: wasmtime.Engine
    users: int = 0  # leases held


class EngineLease:
    """One hold on one engine: while any is held, the engine is ticked and never dropped.

    `release` is idempotent and may come from any thread; as a context manager, the lease is
    released on exit.
    """

    def __init__(self, engines: Engines, entry: _Entry) -> None:
        self.engine = entry.engine
        self.settings = entry.settings
        self._engines = engines
        self._entry: _Entry | None = entry

    def release(self) -> None:
        self._engines._release(self)

    def __enter__(self) -> EngineLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Engines:
    """The process's engines by settings, thread-safe, plus the epoch ticker.

    The ticker runs between `start()` and `close()`; a store whose engine is not ticked never
    reaches its epoch deadline, so start before running guests and close last.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._entries: OrderedDict[EngineSettings, _Entry] = OrderedDict()  # least recently leased first
        self._lock = threading.Lock()
        self._ticker = EpochTicker(limits.runner_epoch_tick_ms)
        self._evicted_listeners: list[Callable[[wasmtime.Engine], None]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def on_evicted(self, listener: Callable[[wasmtime.Engine], None]) -> None:
        """Call `listener(engine)` once an engine is dropped (never while anyone holds it)."""
        self._evicted_listeners.append(listener)

    def lease(self, settings: EngineSettings) -> EngineLease:
        """A hold on the engine for `settings`, made if needed: in a free slot, or in the one of
        the least recently used engine nobody holds; -32002 `runner_engines` when all are held."""
        with self._lock:
            entry, evicted = self._entries.get(settings), None
            if entry is None:
                full = len(self._entries) >= self._limits.runner_engines
                evicted = self._evict_unused() if full else None
                if not full or evicted is not None:
                    entry = self._entries[settings] = _Entry(settings, _new_engine(settings))
                    self._ticker.add(address(entry.engine.ptr()), entry.engine)
                    structlog.get_logger().info("engine_created", fingerprint=settings.fingerprint())
            needed = len(self._entries) + 1
            if entry is not None:
                entry.users += 1
                self._entries.move_to_end(settings)
        if evicted is not None:
            structlog.get_logger().info("engine_evicted", fingerprint=evicted.settings.fingerprint())
            for listener in self._evicted_listeners:
                listener(evicted.engine)
        if entry is None:
            raise self._limits.exceeded("runner_engines", needed, fingerprint=settings.fingerprint())
        return EngineLease(self, entry)

    def hold(self, settings: EngineSettings, engine: wasmtime.Engine) -> EngineLease:
        """Another hold on `engine`, which some lease holds already (a VM takes one while its
        request holds the engine its module was compiled for)."""
        with self._lock:
            entry = self._entries.get(settings)
            if entry is None or entry.engine is not engine or not entry.users:
                raise RuntimeError("hold() needs an engine that a lease holds")
            entry.users += 1
        return EngineLease(self, entry)

    def _release(self, lease: EngineLease) -> None:
        with self._lock:
            entry, lease._entry = lease._entry, None
            if entry is not None:
                entry.users -= 1

    def _evict_unused(self) -> _Entry | None:
        """Under the lock: the least recently used engine nobody holds, off the ticker and forgotten."""
        entry = next((entry for entry in self._entries.values() if not entry.users), None)
        if entry is not None:
            del self._entries[entry.settings]
            self._ticker.remove(address(entry.engine.ptr()))
        return entry

    def start(self) -> None:
        """Start the ticker (idempotent)."""
        with self._lock:
            self._ticker.start()

    def close(self) -> None:
        """Stop the ticker and wait for it; engines stay usable but are no longer ticked."""
        with self._lock:
            self._ticker.stop()

    def __enter__(self) -> Engines:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _new_engine(settings: EngineSettings) -> wasmtime.Engine:
    config = wasmtime.Config()
    config.strategy = _STRATEGY
    config.epoch_interruption = True
    config.consume_fuel = settings.fuel
    config.max_wasm_stack = settings.stack_bytes
    # wasmtime's default, relied on: an instance maps a module's data segments as a copy-on-write
    # image instead of copying them, which is what makes a pre-initialized module cheap to
    # instantiate (16 MiB of baked state: 10 µs, against 8.6 ms with this off; bench_preinit).
    config.memory_init_cow = True
    return wasmtime.Engine(config)  # consumes the config
