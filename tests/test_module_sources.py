"""sidecar.module_sources and sidecar.module_bytes: a module file known by its seal, and a module
from the compile cache whose bytes are made only when used.

What must hold: the id is always the content's sha256, a changed file is never served from the
entry of its old content (even with its size and mtime put back), and a module that came from the
cache gives exactly the bytes it was loaded from (a snapshot embeds them) and the rewritten ones.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from protocol.methods_vm import ModuleLoadParams
from sidecar.engines import Engines, EngineSettings
from sidecar.limits import load_limits
from sidecar.module_bytes import ModuleBytes
from sidecar.module_sources import sealable
from sidecar.modules import INSTRUMENT_ID, ModuleStore, content_id, instrument_or_keep
from sidecar.wasmbin import instrument

from .guests import call, rpc
from .snapshot_support import KEEPER, observe, read_state, restore, snapshot
from .support import process_session
from .test_snapshots import StartCounter

SETTINGS = EngineSettings(fuel=False, stack_bytes=1 << 20)
SECOND = 1_000_000_000


def small(n: int) -> bytes:
    """A distinct module per `n` < 10, all of one size."""
    return bytes(wasmtime.wat2wasm(f'(module (func (export "f{n}") (result i32) (i32.const {n})))'))


@pytest.fixture
def engines() -> Iterator[Engines]:
    with Engines(load_limits({})) as engines:
        yield engines


def hashes_of(monkeypatch: pytest.MonkeyPatch, data: bytes) -> list[int]:
    """Counts, from now on, every sha256 taken of exactly `data`."""
    seen: list[int] = []
    real = hashlib.sha256

    def counting(given: Any = b"", *args: Any, **kwargs: Any) -> Any:
        if bytes(given) == data:
            seen.append(len(given))
        return real(given, *args, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", counting)
    return seen


def instrumented_load(store: ModuleStore, source: Any, settings: EngineSettings = SETTINGS) -> Any:
    return store.load(source, settings, transform=instrument_or_keep, transform_id=INSTRUMENT_ID)


# ── the bytes an entry keeps ────────────────────────────────────────────────────────────────


def _pairs() -> Iterator[tuple[str, bytes, bytes]]:
    rng = random.Random(15)
    base = bytes(rng.randrange(256) for _ in range(200_000))  # past one chunk of the comparison
    yield "same", base, base
    yield "a middle rewritten", base[:70_000] + b"export" * 9 + base[90_000:], base
    yield "a section dropped", base[:70_000] + base[70_100:], base
    yield "a section added", base, base[:150_000] + b"start" + base[150_000:]
    yield "all different", b"\x01" * 500, b"\x02" * 700
    yield "the source empty", b"wasm", b""
    yield "shared only at the end", b"ab" + base, b"cd" + base
    yield "a prefix of the other", base[:100], base


@pytest.mark.parametrize(("wasm", "source"), [pair[1:] for pair in _pairs()], ids=[pair[0] for pair in _pairs()])
def test_an_entry_keeps_both_forms_in_little_more_than_one(wasm: bytes, source: bytes) -> None:
    parts = ModuleBytes(wasm, source).layout()
    extra = b"".join(parts)
    stored = ModuleBytes.stored(memoryview(extra).toreadonly())
    assert stored is not None and stored.size == len(source)
    assert stored.wasm == wasm and stored.source == source
    differing = sum(1 for a, b in zip(wasm, source, strict=False) if a != b) + abs(len(wasm) - len(source))
    assert len(extra) <= len(wasm) + differing + 64


def test_extra_that_does_not_add_up_is_no_module() -> None:
    assert ModuleBytes.stored(memoryview(b"short")) is None
    parts = ModuleBytes(b"x" * 10, b"x" * 10 + b"y").layout()  # the source: all ten shared, and a byte
    assert ModuleBytes.stored(memoryview(b"".join(parts))[3:]) is None  # its compiled bytes cut short


def test_a_cache_hit_gives_the_loaded_and_the_rewritten_bytes(engines: Engines, tmp_path: Path) -> None:
    guest = bytes(wasmtime.wat2wasm(KEEPER))
    rewritten = instrument(guest).wasm
    assert rewritten != guest  # the keeper has a start function and hidden state: the rewrite shows
    first = instrumented_load(ModuleStore(load_limits({}), engines, tmp_path), guest)
    later = instrumented_load(ModuleStore(load_limits({}), engines, tmp_path), guest)
    assert not first.cached and later.cached and later.module_id == content_id(guest)
    assert later.source == guest and later.wasm == rewritten and later.size_bytes == len(guest)
    assert later.exports == first.exports and later.memory_minimums == first.memory_minimums
    # Another engine compiles from those bytes, and its entry keeps them as well.
    metered = EngineSettings(fuel=True, stack_bytes=1 << 20)
    store = ModuleStore(load_limits({}), engines, tmp_path)
    other = store.get(instrumented_load(store, guest).module_id, metered)
    assert not other.cached and other.source == guest and other.wasm == rewritten
    again = instrumented_load(ModuleStore(load_limits({}), engines, tmp_path), guest, metered)
    assert again.cached and again.source == guest and again.wasm == rewritten


# ── a module file's seal ────────────────────────────────────────────────────────────────────


def test_a_file_is_sealed_only_once_a_later_write_must_change_its_ctime() -> None:
    began = 1_700_000_000 * SECOND + 123_456_789
    assert not sealable(began - 1, began)  # written just before the read: the same clock step
    assert sealable(began - SECOND - 7, began)  # a second is past any coarse clock's step
    whole = 1_700_000_000 * SECOND  # a filesystem that keeps whole seconds may keep two
    assert not sealable(whole, whole + SECOND + SECOND // 2) and sealable(whole, whole + 3 * SECOND)


@pytest.mark.anyio
async def test_a_file_hashed_in_one_process_is_known_unread_then_its_change_is_seen(
        engines: Engines, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(cache))
    path = tmp_path / "guest.wasm"
    path.write_bytes(small(1))
    params = ModuleLoadParams(path=str(path))
    async with process_session() as (client, _):
        first = await rpc(client, "module.load", {"path": str(path)})
    assert first["module_id"] == content_id(small(1)) and first["cached"] is False

    hashed = hashes_of(monkeypatch, small(1))
    store = ModuleStore(load_limits({}), engines, cache)
    known = instrumented_load(store, store.source(params))
    assert known.cached and known.module_id == first["module_id"] and hashed == []  # by its seal
    assert known.source == small(1)  # from the entry: the file was never read

    # Other bytes of the same size, and the size and mtime put back: only the ctime tells.
    before = path.stat()
    path.write_bytes(small(2))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    async with process_session() as (client, _):
        changed = await rpc(client, "module.load", {"path": str(path)})
    assert changed["module_id"] == content_id(small(2)) and [e["name"] for e in changed["exports"]] == ["f2"]
    store = ModuleStore(load_limits({}), engines, cache)
    assert instrumented_load(store, store.source(params)).module_id == content_id(small(2))


# ── end to end: a module from the cache in a later process ─────────────────────────────────


@pytest.mark.anyio
async def test_a_vm_of_a_cached_module_snapshots_the_bytes_it_was_loaded_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(tmp_path / "cache"))
    guest = bytes(wasmtime.wat2wasm(KEEPER))
    path = tmp_path / "keeper.wasm"
    path.write_bytes(guest)
    host = StartCounter()
    async with process_session(host_handler=host) as (client, _):
        assert (await rpc(client, "module.load", {"path": str(path)}))["cached"] is False
    async with process_session(host_handler=host) as (client, _):
        loaded = await rpc(client, "module.load", {"path": str(path)})
        vm_id = (await rpc(client, "vm.create", {"path": str(path)}))["vm_id"]
        await call(client, vm_id, "step", 7)
        before = await observe(client, vm_id)
        await snapshot(client, vm_id, tmp_path / "keeper.state")
        await snapshot(client, vm_id, tmp_path / "keeper-wasm.wasm", format="wasm")
        baked = await rpc(client, "vm.create", {"path": str(tmp_path / "keeper-wasm.wasm")})
        assert await observe(client, baked["vm_id"]) == before
    assert loaded["cached"] is True and read_state(tmp_path / "keeper.state").module == guest
    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(tmp_path / "elsewhere"))  # a machine without the entry
    async with process_session(host_handler=host) as (client, _):
        restored = (await restore(client, tmp_path / "keeper.state"))["vm_id"]
        assert await observe(client, restored) == before
