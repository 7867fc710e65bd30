"""A real big guest: the CPython 3.11 WASI build survives every rewrite and still runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import wasmtime

from sidecar.wasmbin import Instrumented, Module, instrument, preinitialize

pytestmark = pytest.mark.slow

CPYTHON = Path(__file__).parent / "assets" / "cache" / "python-3.11.3.wasm"


@pytest.fixture(scope="module")
def cpython() -> bytes:
    if not CPYTHON.exists():
        pytest.skip(f"{CPYTHON} is missing: it is gitignored, CI places it there")
    return CPYTHON.read_bytes()


@pytest.fixture(scope="module")
def instrumented(cpython: bytes) -> Instrumented:
    return instrument(cpython)


@pytest.fixture(scope="module")
def engine() -> wasmtime.Engine:
    return wasmtime.Engine()


def run_python(
    engine: wasmtime.Engine, module: wasmtime.Module, tmp_path: Path, info: Instrumented | None = None
) -> Any:
    """Run `python -c 'print(1+1)'` and return its stdout; with `info`, capture a fresh instance instead."""
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    try:
        config = wasmtime.WasiConfig()
        config.argv = ["python", "-c", "print(1+1)"]
        config.stdout_file = str(tmp_path / "stdout")
        store.set_wasi(config)
        exports = linker.instantiate(store, module).exports(store)
        if info is not None:
            (index, name), = info.memories
            memory = exports[name]
            globals_ = {g.index: exports[g.export].value(store) for g in info.globals}
            return {index: memory.read(store, 0, memory.data_len(store))}, globals_
        try:
            exports["_start"](store)
        except wasmtime.ExitTrap as exit_:
            assert exit_.code == 0
        return (tmp_path / "stdout").read_text()
    finally:
        store.close()


def test_parse_then_write_is_byte_identical(cpython):
    assert Module.parse(cpython).to_bytes() == cpython


def test_the_instrumented_build_is_snapshottable_and_names_its_state(instrumented):
    assert instrumented.snapshottable, instrumented.reasons
    assert [m.export for m in instrumented.memories] == ["__sidecar_memory_0"]
    # The one mutable global is the shadow stack pointer.
    assert [(g.export, g.valtype) for g in instrumented.globals] == [("__sidecar_global_0", "i32")]
    assert instrumented.start_export is None and instrumented.grows_memory
    assert instrument(instrumented.wasm).wasm == instrumented.wasm


def test_instrumented_and_preinitialized_builds_still_run_python(engine, instrumented, tmp_path):
    module = wasmtime.Module(engine, instrumented.wasm)
    assert run_python(engine, module, tmp_path) == "2\n"

    memories, globals_ = run_python(engine, module, tmp_path, info=instrumented)
    snapshot = preinitialize(instrumented.wasm, memories, globals_)
    assert run_python(engine, wasmtime.Module(engine, snapshot), tmp_path) == "2\n"
