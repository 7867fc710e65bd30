"""A small reader/writer for the WebAssembly binary format, and the two snapshot rewrites.

Pure code over bytes, no I/O and no wasmtime: `instrument` (at load) adds the `__sidecar_*`
exports that reach a module's internal memories and globals and says whether its state can be
snapshotted; `preinitialize` turns captured state into a standalone Wizer-style module. Every
malformed input raises `WasmFormatError`; refusals of well-formed input raise its subclass
`SnapshotError`.
"""

from .instrument import (
    PREFIX,
    START_EXPORT,
    ExportedGlobal,
    ExportedMemory,
    Instrumented,
    SnapshotError,
    instrument,
)
from .module import Module, Section
from .preinit import SNAPSHOT_DATA_SEGMENTS_MAX, preinitialize
from .reader import WasmFormatError

__all__ = [
    "PREFIX",
    "START_EXPORT",
    "ExportedGlobal",
    "ExportedMemory",
    "Instrumented",
    "Module",
    "SNAPSHOT_DATA_SEGMENTS_MAX",
    "Section",
    "SnapshotError",
    "WasmFormatError",
    "instrument",
    "preinitialize",
]
