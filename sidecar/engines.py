"""wasmtime engines, one per distinct engine setting, and the epoch ticker that drives deadlines.

Owns the engine-level configuration every guest runs under (epoch interruption always on,
fuel metering and the wasm stack cap as chosen per `EngineSettings`, cranelift), the
fingerprint that names a configuration in compile-cache keys, and the single ticker thread
that advances the epoch of every engine (native: it never takes the GIL). Knows nothing about
modules, stores or VMs: callers set each store's epoch deadline in ticks of
`runner_epoch_tick_ms` and decide what a trap means.

Why per-settings engines: `consume_fuel` and `max_wasm_stack` cannot differ per store and a
`Module` belongs to one engine, so a VM with other settings needs another engine (and another
compile or cache entry).
"""

from __future__ import annotations

import platform
import sys
import threading
from dataclasses import dataclass
from importlib.metadata import version

import structlog
import wasmtime

from .limits import Limits
from .wasmffi.capi import address
from .wasmffi.native import EpochTicker

_WASMTIME_VERSION = version("wasmtime")
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


class Engines:
    """The process's engines by settings, thread-safe, plus the epoch ticker.

    Engines live as long as this object (modules and stores keep theirs alive regardless). The
    ticker runs between `start()` and `close()`; a store whose engine is not ticked never
    reaches its epoch deadline, so start before running guests and close last.
    """

    def __init__(self, limits: Limits) -> None:
        self._engines: dict[EngineSettings, wasmtime.Engine] = {}
        self._lock = threading.Lock()
        self._ticker = EpochTicker(limits.runner_epoch_tick_ms)

    def get(self, settings: EngineSettings) -> wasmtime.Engine:
        with self._lock:
            engine = self._engines.get(settings)
            if engine is None:
                engine = self._engines[settings] = _new_engine(settings)
                self._ticker.add(address(engine.ptr()), engine)
                structlog.get_logger().info("engine_created", fingerprint=settings.fingerprint())
            return engine

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
    return wasmtime.Engine(config)  # consumes the config
