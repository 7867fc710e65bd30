"""sidecar.engines without the sidecar: at most `runner_engines` engines, dropped least recently
used once nobody holds them, and what the module store forgets with them.

The same through the wire (refusals, deadlines of VMs on a kept engine, modules compiled again)
is in test_vm_engines.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import wasmtime
from structlog.testing import capture_logs

from protocol.errors import LimitExceededError
from sidecar.engines import Engines, EngineSettings
from sidecar.limits import load_limits
from sidecar.modules import ModuleStore

GUEST = bytes(wasmtime.wat2wasm('(module (func (export "f") (result i32) (i32.const 7)))'))


def settings(i: int) -> EngineSettings:
    return EngineSettings(fuel=False, stack_bytes=(64 + i) << 10)


@pytest.fixture
def engines() -> Iterator[Engines]:
    with Engines(load_limits({"SIDECAR_RUNNER_ENGINES": "2"})) as engines:
        yield engines


def test_the_least_recently_used_engine_nobody_holds_is_dropped_for_a_new_setting(engines: Engines) -> None:
    dropped: list[wasmtime.Engine] = []
    engines.on_evicted(dropped.append)
    with engines.lease(settings(0)) as first:
        pass
    with engines.lease(settings(1)) as second:
        pass
    engines.lease(settings(0)).release()  # used again: the second is now the least recently used
    with capture_logs() as logs, engines.lease(settings(2)):
        assert dropped == [second.engine] and len(engines) == 2
        assert [entry["fingerprint"] for entry in logs if entry["event"] == "engine_evicted"] == [
            settings(1).fingerprint()
        ]
        with engines.lease(settings(0)) as again:
            assert again.engine is first.engine  # kept, not made again


def test_a_new_setting_is_refused_by_name_while_every_engine_is_held(engines: Engines) -> None:
    held = [engines.lease(settings(0)), engines.lease(settings(1))]
    with pytest.raises(LimitExceededError) as caught:
        engines.lease(settings(2))
    assert caught.value.details == {"limit": "runner_engines", "env": "SIDECAR_RUNNER_ENGINES", "capacity": 2,
                                    "observed": 3, "fingerprint": settings(2).fingerprint()}
    assert len(engines) == 2
    with engines.lease(settings(1)):  # a setting that has its engine needs no slot
        pass
    held[1].release()
    held[1].release()  # idempotent: the engine is not released twice
    with engines.lease(settings(2)):
        with pytest.raises(LimitExceededError):
            engines.lease(settings(1))  # both engines are held again
    held[0].release()


def test_hold_is_another_lease_on_an_engine_already_held(engines: Engines) -> None:
    with engines.lease(settings(0)) as lease:
        extra = engines.hold(lease.settings, lease.engine)
    with engines.lease(settings(1)), pytest.raises(LimitExceededError):
        engines.lease(settings(2))  # `extra` keeps the first engine after its lease ended
    extra.release()
    with pytest.raises(RuntimeError, match="a lease holds"):
        engines.hold(settings(0), extra.engine)  # nobody holds it now: it may be gone any moment
    with engines.lease(settings(0)), pytest.raises(RuntimeError):
        engines.hold(settings(0), wasmtime.Engine())  # not that setting's engine


def test_the_code_of_a_dropped_engine_is_forgotten_and_its_module_compiled_again(engines: Engines) -> None:
    store = ModuleStore(load_limits({"SIDECAR_RUNNER_CACHE_BYTES": "0"}), engines)
    first = store.load(GUEST, settings(0))
    assert store.get(first.module_id, settings(0)).module is first.module
    store.load(GUEST, settings(1))
    store.load(GUEST, settings(2))  # drops the engine of settings(0), and its code with it
    again = store.get(first.module_id, settings(0))  # the id is still known
    assert again.engine is not first.engine and again.module is not first.module and not again.cached
    wasm_store = wasmtime.Store(again.engine)
    try:
        wasm_store.set_epoch_deadline(1_000_000)
        assert wasmtime.Instance(wasm_store, again.module, []).exports(wasm_store)["f"](wasm_store) == 7
    finally:
        wasm_store.close()
