"""sidecar.engines, sidecar.modules, sidecar.compile_cache: sources, refusals, descriptions, the caches.

Threads are sequenced with events, never sleeps. Anything that could abort the process on a
regression (naming a v128 type) and the 20 MB CPython module run in a subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import wasmtime
from structlog.testing import capture_logs

from protocol.errors import ErrorCode, InvalidModuleError, InvalidParamsError, LimitExceededError
from protocol.methods_vm import ModuleLoadParams, VmCreateParams
from sidecar import modules
from sidecar.compile_cache import CompileCache
from sidecar.engines import Engines, EngineSettings
from sidecar.limits import Limits, load_limits
from sidecar.module_bytes import ModuleBytes
from sidecar.modules import ModuleStore, load_key, read_source

WAIT = 10.0  # seconds: the ceiling on any wait, never an expected duration
REPO = Path(__file__).resolve().parents[1]
CPYTHON = REPO / "tests" / "assets" / "cache" / "python-3.11.3.wasm"
SETTINGS = EngineSettings(fuel=False, stack_bytes=1 << 20)

GUEST_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
  (import "env" "mem" (memory 3))
  (import "env" "g" (global i64))
  (memory 2 10)
  (memory i64 1)
  (table (export "table") 1 funcref)
  (global (export "counter") (mut i32) (i32.const 0))
  (func $init)
  (start $init)
  (func (export "_start"))
  (func (export "mix") (param i64 f32 f64 i32) (result f64 i32) (local.get 2) (local.get 3))
  (func (export "spin") (loop $l (br $l)))
  (export "memory" (memory 1))
)
"""


def wasm_of(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


def small(n: int) -> bytes:
    """A distinct small module per `n`."""
    return wasm_of(f'(module (func (export "f{n}") (result i32) (i32.const {n})))')


GUEST = wasm_of(GUEST_WAT)
INVALID = wasm_of('(module (func (result i32) (i64.const 1)))')  # well-formed, fails validation


def limits_with(**values: str) -> Limits:
    return load_limits({f"SIDECAR_{name.upper()}": value for name, value in values.items()})


@pytest.fixture
def engines() -> Iterator[Engines]:
    with Engines(load_limits({})) as engines:
        yield engines


@pytest.fixture
def store(engines: Engines, tmp_path: Path) -> ModuleStore:
    return ModuleStore(load_limits({}), engines, tmp_path / "cache")


def compiles(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Records every real compile the store starts."""
    seen: list[bytes] = []
    real = modules._compile

    def counting(engine: Any, source: bytes, *args: Any) -> Any:
        seen.append(source)
        return real(engine, source, *args)

    monkeypatch.setattr(modules, "_compile", counting)
    return seen


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.cwasm"))


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


# ── reading sources ─────────────────────────────────────────────────────────────────────────


def test_each_source_kind_gives_the_same_bytes(tmp_path: Path) -> None:
    path = tmp_path / "guest.wasm"
    path.write_bytes(GUEST)
    limits = load_limits({})
    assert read_source(ModuleLoadParams(path=str(path)), limits).data() == GUEST
    assert read_source(ModuleLoadParams(wasm_base64=GUEST), limits).data() == GUEST
    assert read_source(ModuleLoadParams(wat=GUEST_WAT), limits).data() == GUEST
    # vm.create's params carry the same three sources; the wire decoder turns base64 into bytes.
    decoded = msgspec.json.decode(
        json.dumps({"wasm_base64": base64.b64encode(GUEST).decode()}), type=VmCreateParams
    )
    assert isinstance(decoded.wasm_base64, bytes) and read_source(decoded, limits).data() == GUEST


def test_exactly_one_source_is_required() -> None:
    with pytest.raises(InvalidParamsError):
        read_source(ModuleLoadParams(), load_limits({}))
    with pytest.raises(InvalidParamsError):
        read_source(ModuleLoadParams(wat="(module)", wasm_base64=b"\0asm"), load_limits({}))


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_unreadable_paths_are_refused_naming_the_path(tmp_path: Path, make: str) -> None:
    path = tmp_path / "guest.wasm"
    if make == "directory":
        path.mkdir()
    with pytest.raises(InvalidModuleError) as caught:
        read_source(ModuleLoadParams(path=str(path)), load_limits({}))
    assert caught.value.code == ErrorCode.INVALID_MODULE
    assert caught.value.data["stage"] == "read" and caught.value.data["path"] == str(path)
    assert str(path) in caught.value.message


def test_a_file_over_the_limit_is_refused_by_its_size_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.wasm"
    with open(path, "wb") as file:
        file.truncate(1 << 40)  # sparse: a TiB of nothing on disk
    # `observed` is the reported size, not the bound plus one: refused before a byte was read.
    with capture_logs() as logs, pytest.raises(LimitExceededError) as caught:
        read_source(ModuleLoadParams(path=str(path)), load_limits({}))
    assert caught.value.code == ErrorCode.LIMIT_EXCEEDED
    assert caught.value.data["limit"] == "runner_module_bytes"
    assert caught.value.data["observed"] == 1 << 40 and caught.value.data["env"] == "SIDECAR_RUNNER_MODULE_BYTES"
    assert events(logs, "limit_exhausted")


@pytest.mark.parametrize("source", ["wasm_base64", "wat"])
def test_inline_sources_over_the_limit_are_refused(source: str) -> None:
    limits = limits_with(runner_module_bytes="1 KiB")
    body = "(module " + "(func)" * 400 + ")"
    params = ModuleLoadParams(wat=body) if source == "wat" else ModuleLoadParams(wasm_base64=wasm_of(body))
    with pytest.raises(LimitExceededError) as caught:
        read_source(params, limits)
    assert caught.value.data["limit"] == "runner_module_bytes" and caught.value.data["capacity"] == 1024


def test_bad_text_is_a_parse_error_with_its_position() -> None:
    with pytest.raises(InvalidModuleError) as caught:
        read_source(ModuleLoadParams(wat="(module (func)))x"), load_limits({}))
    assert caught.value.data["stage"] == "parse"
    assert "<anon>:1:" in caught.value.message and "\n" not in caught.value.message


# ── refusals and descriptions ───────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("data", "stage", "words"),
    [
        (b"garbage, not wasm at all", "parse", "bad magic"),
        (b"(module)", "parse", "bad magic"),  # wasmtime would compile text: inline bytes must be binary
        (b"", "parse", "bad magic"),
        (GUEST[: len(GUEST) // 2], "parse", "malformed module"),
        (b"\0asm\x0d\0\x01\0", "parse", "component"),
        (INVALID, "validate", "type mismatch"),
    ],
    ids=["garbage", "text", "empty", "truncated", "component", "invalid"],
)
def test_refusals_name_the_stage_and_wasmtimes_reason(store: ModuleStore, data: bytes, stage: str, words: str):
    with pytest.raises(InvalidModuleError) as caught:
        store.load(data, SETTINGS)
    assert caught.value.code == ErrorCode.INVALID_MODULE
    assert caught.value.data == {"kind": "invalid_module", "stage": stage}
    assert words in caught.value.message
    assert "Traceback" not in caught.value.message and "Caused by" not in caught.value.message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_description_lists_exports_imports_and_memories(store: ModuleStore) -> None:
    compiled = store.load(GUEST, SETTINGS)
    assert compiled.module_id == "sha256:" + hashlib.sha256(GUEST).hexdigest()
    assert compiled.size_bytes == len(GUEST) and compiled.wasm == GUEST and compiled.settings == SETTINGS
    assert not compiled.cached and compiled.compile_ms > 0
    assert [msgspec.to_builtins(e) for e in compiled.exports] == [
        {"name": "table", "kind": "table"},
        {"name": "counter", "kind": "global"},
        {"name": "_start", "kind": "func", "params": [], "results": []},
        {"name": "mix", "kind": "func", "params": ["i64", "f32", "f64", "i32"], "results": ["f64", "i32"]},
        {"name": "spin", "kind": "func", "params": [], "results": []},
        {"name": "memory", "kind": "memory"},
    ]
    assert [msgspec.to_builtins(i) for i in compiled.imports] == [
        {"module": "wasi_snapshot_preview1", "name": "fd_write", "kind": "func",
         "params": ["i32", "i32", "i32", "i32"], "results": ["i32"]},
        {"module": "env", "name": "mem", "kind": "memory"},
        {"module": "env", "name": "g", "kind": "global"},
    ]
    page = 65536
    assert compiled.memory_minimums == [3 * page, 2 * page, 1 * page]  # imported first, then defined
    assert compiled.has_start and compiled.wasi and compiled.command



def test_table_minimums_cover_every_table_encoding(store: ModuleStore) -> None:
    """Imported first; table64 and tables with an initializer expression read like the rest."""
    compiled = store.load(wasm_of("""(module
      (import "env" "t" (table 7 externref))
      (table 3 funcref) (table i64 40000 funcref)
      (table 5 (ref null func) (ref.null func)) (table 2 (ref func) (ref.func $f))
      (func $f))"""), SETTINGS)
    assert compiled.table_minimums == [7, 3, 40000, 5, 2]
    assert store.load(small(1), SETTINGS).table_minimums == []

def test_a_plain_module_is_neither_wasi_nor_command(store: ModuleStore) -> None:
    compiled = store.load(small(1), SETTINGS)
    assert (compiled.has_start, compiled.wasi, compiled.command, compiled.memory_minimums) == (False, False, False, [])


def test_v128_signatures_are_named_without_aborting(tmp_path: Path) -> None:
    # In a subprocess: were `str(ValType)` used, wasmtime 50 would abort the whole test run.
    script = textwrap.dedent("""
        import json, wasmtime
        from sidecar.engines import Engines, EngineSettings
        from sidecar.limits import load_limits
        from sidecar.modules import ModuleStore
        wasm = wasmtime.wat2wasm('''(module
            (import "env" "h" (func (param v128 i32) (result v128)))
            (global (export "vg") v128 (v128.const i64x2 0 0))
            (func (export "splat") (param i32) (result v128) (i32x4.splat (local.get 0))))''')
        with Engines(load_limits({})) as engines:
            m = ModuleStore(load_limits({}), engines, None).load(bytes(wasm), EngineSettings(False, 1 << 20))
        print(json.dumps([[e.name, e.kind, e.params or None, e.results or None] for e in m.imports + m.exports]))
    """)
    env = {**os.environ, "SIDECAR_RUNNER_CACHE_BYTES": "0", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env,
                          check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [
        ["h", "func", ["v128", "i32"], ["v128"]],
        ["vg", "global", None, None],
        ["splat", "func", ["i32"], ["v128"]],
    ]


# ── the in-memory table ─────────────────────────────────────────────────────────────────────


def test_a_second_load_comes_from_the_table(store: ModuleStore, monkeypatch) -> None:
    first = store.load(GUEST, SETTINGS)
    seen = compiles(monkeypatch)
    again = store.load(GUEST, SETTINGS)
    assert again.cached and again.module is first.module and again.compile_ms == 0 and not seen


def test_get_compiles_for_other_settings_and_refuses_unknown_ids(store: ModuleStore) -> None:
    loaded = store.load(GUEST, SETTINGS)
    metered = EngineSettings(fuel=True, stack_bytes=1 << 20)
    other = store.get(loaded.module_id, metered)
    assert other.settings == metered and other.module is not loaded.module and not other.cached
    assert other.module_id == loaded.module_id and other.size_bytes == loaded.size_bytes
    assert store.get(loaded.module_id, SETTINGS).module is loaded.module
    unknown = "sha256:" + "0" * 64
    with pytest.raises(InvalidModuleError) as caught:
        store.get(unknown, SETTINGS)
    assert caught.value.code == ErrorCode.INVALID_MODULE and unknown in caught.value.message


def test_the_table_is_bounded_by_runner_modules(engines: Engines) -> None:
    store = ModuleStore(limits_with(runner_modules="2", runner_cache_bytes="0"), engines)
    first = store.load(small(1), SETTINGS)
    kept = first.module  # a VM's reference survives eviction
    store.load(small(2), SETTINGS)
    store.load(small(3), SETTINGS)
    with pytest.raises(InvalidModuleError):
        store.get(first.module_id, SETTINGS)
    assert kept.exports[0].name == "f1"


def test_concurrent_loads_of_one_module_compile_once(store: ModuleStore, monkeypatch) -> None:
    threads = 6
    waiting, lock = threading.Event(), threading.Lock()
    waiters = [0]

    class CountingFuture(modules.Future):  # type: ignore[misc]
        def result(self, timeout: float | None = None) -> Any:
            with lock:
                waiters[0] += 1
                if waiters[0] == threads - 1:
                    waiting.set()
            return super().result(timeout)

    real, seen = modules._compile, []

    def compile_when_all_wait(*args: Any) -> Any:
        seen.append(args[1])
        assert waiting.wait(WAIT), "the other loads never waited for this compile"
        return real(*args)

    monkeypatch.setattr(modules, "Future", CountingFuture)
    monkeypatch.setattr(modules, "_compile", compile_when_all_wait)
    results: list[Any] = [None] * threads
    workers = [threading.Thread(target=lambda i=i: results.__setitem__(i, store.load(GUEST, SETTINGS)))
               for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT)
    assert len(seen) == 1
    assert len({id(r.module) for r in results}) == 1
    assert sorted(r.cached for r in results) == [False] + [True] * (threads - 1)


def test_concurrent_loads_of_an_invalid_module_all_fail(store: ModuleStore) -> None:
    errors: list[BaseException] = []

    def load() -> None:
        try:
            store.load(INVALID, SETTINGS)
        except InvalidModuleError as exc:
            errors.append(exc)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT)
    assert len(errors) == 4 and store.compiling == 0


def test_a_transform_runs_before_compiling_and_is_keyed(store: ModuleStore, tmp_path: Path, engines) -> None:
    calls: list[bytes] = []

    def rename(data: bytes) -> bytes:
        calls.append(data)
        return small(9)

    compiled = store.load(small(1), SETTINGS, transform=rename, transform_id="rename-v1")
    assert calls == [small(1)] and compiled.wasm == small(9) and compiled.exports[0].name == "f9"
    assert compiled.module_id == "sha256:" + hashlib.sha256(small(1)).hexdigest()
    plain = store.load(small(1), SETTINGS)
    assert plain.exports[0].name == "f1" and not plain.cached
    # A fresh process's store gets the transformed module from disk without running the transform.
    again = ModuleStore(load_limits({}), engines, tmp_path / "cache").load(
        small(1), SETTINGS, transform=rename, transform_id="rename-v1"
    )
    assert again.cached and again.wasm == small(9) and calls == [small(1)]
    with pytest.raises(ValueError):
        store.load(small(1), SETTINGS, transform=rename)


# ── the on-disk cache ───────────────────────────────────────────────────────────────────────


def test_a_second_store_on_the_same_directory_skips_compiling(engines: Engines, tmp_path: Path, monkeypatch):
    first = ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS)
    assert not first.cached and len(entries(tmp_path)) == 1
    seen = compiles(monkeypatch)
    with capture_logs() as logs:
        second = ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS)
    assert second.cached and not seen and second.exports == first.exports
    assert second.memory_minimums == first.memory_minimums and second.has_start
    assert events(logs, "module_compiled")[0]["cached"] is True
    # The deserialized code runs.
    compiled = ModuleStore(load_limits({}), engines, tmp_path).load(small(5), SETTINGS)
    store = wasmtime.Store(compiled.engine)
    try:
        store.set_epoch_deadline(1_000_000)
        instance = wasmtime.Instance(store, compiled.module, [])
        assert instance.exports(store)["f5"](store) == 5
    finally:
        store.close()


def test_notes_of_another_shape_are_computed_again(engines: Engines, tmp_path: Path) -> None:
    """What the store keeps beside an entry (the description, the seals) is a cache too: a note that
    does not decode as what it should be is made again, never trusted."""
    first = ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS)
    cache = CompileCache(tmp_path, 1 << 30)
    notes = sorted(tmp_path.glob("*.note"))
    assert notes
    for note in notes:
        cache.write_note(note.stem, b"\x91\xc0 not what it names")
    again = ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS)
    assert again.cached and again.exports == first.exports and again.imports == first.imports
    assert (again.memory_minimums, again.table_minimums, again.has_start, again.wasi, again.command) == (
        first.memory_minimums, first.table_minimums, first.has_start, first.wasi, first.command)


def corrupt_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


def corrupt_tiny(path: Path) -> None:
    path.write_bytes(b"\x7fELF")


def corrupt_trailer(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the recorded checksum
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [(corrupt_flip, "checksum mismatch"), (corrupt_truncate, "not a cache entry"), (corrupt_tiny, "truncated"),
     (corrupt_trailer, "checksum mismatch")],
    ids=["flipped-byte", "truncated", "tiny", "trailer"],
)
def test_a_corrupt_entry_is_rejected_recompiled_and_rewritten(engines, tmp_path: Path, monkeypatch, corrupt,
                                                              reason: str) -> None:
    ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS)
    [entry] = entries(tmp_path)
    good = entry.read_bytes()
    corrupt(entry)
    seen = compiles(monkeypatch)
    with capture_logs() as logs:
        again = ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS)
    assert not again.cached and len(seen) == 1
    assert [e["reason"] for e in events(logs, "compile_cache_rejected")] == [reason]
    assert entry.read_bytes() == good  # rewritten
    assert ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS).cached


def full_hashes(monkeypatch: pytest.MonkeyPatch, entry: Path) -> list[int]:
    """The sizes of what is hashed from now on that could be the entry (notes are far smaller)."""
    seen: list[int] = []
    real = hashlib.sha256
    floor = entry.stat().st_size // 2

    def counting(data: Any = b"", *args: Any, **kwargs: Any) -> Any:
        if len(data) >= floor:
            seen.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", counting)
    return seen


def test_an_entry_is_hashed_in_full_once_then_its_seal_vouches_for_it(engines, tmp_path: Path, monkeypatch) -> None:
    """The writer seals what it wrote; a hit without a seal, or on a file written since, hashes it
    all and seals it again; a sealed hit checks the trailer only."""
    ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS)
    [entry] = entries(tmp_path)
    hashed = full_hashes(monkeypatch, entry)
    assert ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS).cached and hashed == []
    for seal in tmp_path.glob("*.note"):
        seal.unlink()
    assert ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS).cached and len(hashed) == 1
    assert ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS).cached and len(hashed) == 1
    entry.write_bytes(entry.read_bytes())  # written in place, even with the same bytes: not what was sealed
    assert ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS).cached and len(hashed) == 2


def test_an_entry_under_a_foreign_key_is_rejected(engines: Engines, tmp_path: Path) -> None:
    store = ModuleStore(load_limits({}), engines, tmp_path)
    store.load(small(1), SETTINGS)
    [one] = entries(tmp_path)
    store.load(small(2), SETTINGS)
    [two] = [path for path in entries(tmp_path) if path != one]
    two.write_bytes(one.read_bytes())  # valid in itself, but small(1)'s code
    with capture_logs() as logs:
        again = ModuleStore(load_limits({}), engines, tmp_path).load(small(2), SETTINGS)
    assert not again.cached and again.exports[0].name == "f2"
    assert [e["reason"] for e in events(logs, "compile_cache_rejected")] == ["foreign key"]


def test_an_entry_for_another_engine_is_rejected_by_wasmtime(engines: Engines, tmp_path: Path) -> None:
    metered = EngineSettings(fuel=True, stack_bytes=1 << 20)
    cache = CompileCache(tmp_path, 1 << 30)
    module_id = "sha256:" + hashlib.sha256(GUEST).hexdigest()
    # Well-formed and checksummed, but fuel-metered code under the unmetered key.
    with engines.lease(metered) as lease:
        code = wasmtime.Module(lease.engine, GUEST)
        cache.write(load_key(module_id, "", SETTINGS), code, ModuleBytes(GUEST).layout())
    with capture_logs() as logs:
        compiled = ModuleStore(load_limits({}), engines, tmp_path).load(GUEST, SETTINGS)
    assert not compiled.cached
    [rejected] = events(logs, "compile_cache_rejected")
    assert rejected["reason"].startswith("incompatible: ") and "fuel" in rejected["reason"]


def test_engine_settings_pick_different_entries(engines: Engines, tmp_path: Path) -> None:
    store = ModuleStore(load_limits({}), engines, tmp_path)
    store.load(GUEST, SETTINGS)
    store.load(GUEST, EngineSettings(fuel=True, stack_bytes=1 << 20))
    store.load(GUEST, EngineSettings(fuel=False, stack_bytes=2 << 20))
    assert len(entries(tmp_path)) == 3
    fresh = ModuleStore(load_limits({}), engines, tmp_path)
    assert all(fresh.load(GUEST, s).cached for s in (SETTINGS, EngineSettings(True, 1 << 20)))


def test_the_cache_is_bounded_and_evicts_least_recently_used(engines: Engines, tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    ModuleStore(load_limits({}), engines, probe).load(small(1), SETTINGS)
    size = entries(probe)[0].stat().st_size
    limits = limits_with(runner_cache_bytes=str(size * 5 // 2))  # two entries fit, three do not
    cache_dir = tmp_path / "cache"
    one, two = (CompileCache(cache_dir, 0).path(load_key(ModuleStore(limits, engines, cache_dir).load(
        small(n), SETTINGS).module_id, "", SETTINGS)) for n in (1, 2))
    os.utime(one, ns=(10**15, 10**15))  # file times are coarse: order them explicitly, in the past
    os.utime(two, ns=(2 * 10**15, 2 * 10**15))
    assert ModuleStore(limits, engines, cache_dir).load(small(1), SETTINGS).cached  # touches one: now newest
    with capture_logs() as logs:
        ModuleStore(limits, engines, cache_dir).load(small(3), SETTINGS)
    assert one.exists() and not two.exists() and len(entries(cache_dir)) == 2
    assert [e["path"] for e in events(logs, "compile_cache_evicted")] == [str(two)]


def test_an_entry_bigger_than_the_whole_cache_is_not_written(engines: Engines, tmp_path: Path) -> None:
    with capture_logs() as logs:
        ModuleStore(limits_with(runner_cache_bytes="1 KiB"), engines, tmp_path).load(GUEST, SETTINGS)
    assert not entries(tmp_path) and events(logs, "compile_cache_skipped")


def test_zero_turns_the_cache_off(engines: Engines, tmp_path: Path) -> None:
    limits = limits_with(runner_cache_bytes="0")
    ModuleStore(limits, engines, tmp_path / "cache").load(GUEST, SETTINGS)
    assert not (tmp_path / "cache").exists()
    assert not ModuleStore(limits, engines, tmp_path / "cache").load(GUEST, SETTINGS).cached


def test_an_unusable_directory_only_warns(engines: Engines, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with capture_logs() as logs:
        store = ModuleStore(load_limits({}), engines, blocker / "cache")
        compiled = store.load(GUEST, SETTINGS)
    assert not compiled.cached and compiled.exports
    [warning] = events(logs, "compile_cache_unavailable")
    assert warning["log_level"] == "warning" and warning["directory"] == str(blocker / "cache")


@pytest.mark.parametrize("variable", ["SIDECAR_CACHE_DIR", "XDG_CACHE_HOME"])
def test_the_default_directory_follows_the_environment(engines, tmp_path: Path, monkeypatch, variable: str):
    monkeypatch.delenv("SIDECAR_CACHE_DIR", raising=False)
    monkeypatch.setenv(variable, str(tmp_path))
    ModuleStore(load_limits({}), engines).load(GUEST, SETTINGS)
    expected = tmp_path if variable == "SIDECAR_CACHE_DIR" else tmp_path / "wasm-sidecar"
    assert len(entries(expected)) == 1


# ── engines and the epoch ticker ────────────────────────────────────────────────────────────


def test_engines_are_shared_per_settings_and_fingerprinted() -> None:
    engines = Engines(load_limits({}))
    with engines.lease(SETTINGS) as plain, engines.lease(EngineSettings(False, 1 << 20)) as same, \
            engines.lease(EngineSettings(True, 1 << 20)) as metered:
        assert plain.engine is same.engine and plain.engine is not metered.engine
    fingerprint = SETTINGS.fingerprint()
    assert "wasmtime=50." in fingerprint and "fuel=0" in fingerprint and "stack_bytes=1048576" in fingerprint
    assert fingerprint != EngineSettings(True, 1 << 20).fingerprint()
    assert EngineSettings.from_limits(limits_with(vm_fuel="1000", vm_stack_bytes="64 KiB")) == EngineSettings(
        True, 64 << 10
    )


def test_the_ticker_interrupts_a_spinning_guest_and_stops_on_close(store: ModuleStore, engines: Engines):
    compiled = store.load(wasm_of('(module (func (export "spin") (loop $l (br $l))))'), SETTINGS)
    spin, wasm_store = compiled.module, wasmtime.Store(compiled.engine)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            instance.exports(wasm_store)["spin"](wasm_store)
        except wasmtime.Trap as trap:
            outcome.append(trap)

    try:
        wasm_store.set_epoch_deadline(5)
        instance = wasmtime.Instance(wasm_store, spin, [])
        worker = threading.Thread(target=run, daemon=True)  # daemon: were the ticker broken, it spins on
        worker.start()
        worker.join(WAIT)
        assert not worker.is_alive(), "the epoch never advanced"
        assert outcome[0].trap_code == wasmtime.TrapCode.INTERRUPT
    finally:
        wasm_store.close()
    engines.close()
    assert not engines._ticker.running
    engines.close()  # idempotent


# ── the real big module ─────────────────────────────────────────────────────────────────────


@pytest.mark.slow
def test_cpython_loads_from_the_cache_in_a_second_process(tmp_path: Path) -> None:
    if not CPYTHON.exists():
        pytest.skip(f"{CPYTHON} is missing (gitignored; CI provides it)")
    script = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from sidecar.engines import Engines, EngineSettings
        from sidecar.limits import load_limits
        from sidecar.modules import ModuleStore
        with Engines(load_limits({{}})) as engines:
            m = ModuleStore(load_limits({{}}), engines, Path({str(tmp_path)!r})).load(
                Path({str(CPYTHON)!r}).read_bytes(), EngineSettings(False, 1 << 20))
        print(json.dumps({{"cached": m.cached, "ms": m.compile_ms, "wasi": m.wasi, "command": m.command}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run() -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                              check=False)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    first, second = run(), run()
    assert not first["cached"] and second["cached"]
    assert first["wasi"] and first["command"] and second["wasi"] and second["command"]
    assert second["ms"] < first["ms"] / 10
