"""The limits inventory, environment rules, ceilings and the errors a biting bound produces."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from protocol.errors import ErrorCode, InvalidParamsError, LimitExceededError
from sidecar.limits import (
    InventoryError,
    Limits,
    LimitSpec,
    format_value,
    load_inventory,
    load_limits,
    process_limits,
)

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
EXPECTED = {
    "protocol_frame_bytes": ("protocol", 16 * MIB),
    "protocol_requests_in_flight": ("protocol", 1024),
    "protocol_completed_ids": ("protocol", 4096),
    "protocol_host_call_timeout_ms": ("protocol", 30000),
    "protocol_outbox_bytes": ("protocol", 32 * MIB),
    "protocol_shutdown_ms": ("protocol", 1000),
    "vm_memory_bytes": ("guest", 128 * MIB),
    "vm_call_timeout_ms": ("guest", 30000),
    "vm_fuel": ("guest", 0),
    "vm_stack_bytes": ("guest", MIB),
    "vm_output_bytes": ("guest", 4 * MIB),
    "vm_input_bytes": ("guest", 8 * MIB),
    "vm_host_call_bytes": ("guest", MIB),
    "vm_host_calls_in_flight": ("guest", 64),
    "vm_table_elements": ("guest", 100000),
    "vm_instances": ("guest", 16),
    "vm_tables": ("guest", 16),
    "vm_memories": ("guest", 4),
    "vm_recycle_after_calls": ("guest", 512),
    "vm_recycle_memory_bytes": ("guest", 64 * MIB),
    "vm_rewind_resident_bytes": ("guest", 8 * MIB),
    "vm_pool_instances": ("guest", 4),
    "vm_hibernate_idle_ms": ("guest", 0),
    "runner_module_bytes": ("runner", 64 * MIB),
    "runner_vms": ("runner", 1000),
    "runner_mcp_sessions": ("runner", 32),
    "runner_modules": ("runner", 256),
    "runner_engines": ("runner", 8),
    "runner_worker_threads": ("runner", 16),
    "runner_cache_bytes": ("runner", 2 << 30),
    "runner_preinit_timeout_ms": ("runner", 60000),
    "runner_snapshot_bytes": ("runner", 1 << 30),
    "runner_input_spin_us": ("runner", 50),
    "runner_epoch_tick_ms": ("runner", 1),
    "runner_resident_vms": ("runner", 0),
    "runner_spare_instances": ("runner", 8),
    "runner_state_bytes": ("runner", 8 << 30),
    "runner_hibernate_exit_ms": ("runner", 10000),
    "wasm_page_bytes": ("invariant", 65536),
    "timer_max_ms": ("invariant", 2147483647),
    "snapshot_chunk_bytes": ("invariant", 4096),
    "snapshot_data_segments_max": ("invariant", 10000),
}
ZERO_MEANS_OFF = {
    "vm_fuel", "vm_recycle_after_calls", "vm_recycle_memory_bytes", "runner_cache_bytes", "runner_input_spin_us",
    "vm_hibernate_idle_ms", "runner_resident_vms", "runner_spare_instances",
}


def ignored(logs: list[dict]) -> list[dict]:
    return [entry for entry in logs if entry["event"] == "limit_env_ignored"]


# ── the inventory file ──────────────────────────────────────────────────────────────────────


def test_inventory_holds_exactly_the_contracted_entries():
    specs = load_inventory()
    assert {spec.name: (spec.limit_class, spec.default) for spec in specs} == EXPECTED
    assert {spec.name for spec in specs if spec.zero_means_off} == ZERO_MEANS_OFF


def test_toml_entries_are_complete_and_well_formed():
    raw = tomllib.loads((REPO / "config" / "limits.toml").read_text())["limit"]
    specs = {spec.name: spec for spec in load_inventory()}
    timer_max = specs["timer_max_ms"].default
    for entry in raw:
        name = entry["name"]
        assert {"name", "class", "default", "unit", "rationale", "zero_means_off"} <= set(entry), name
        assert set(entry) <= {"name", "class", "env", "default", "unit", "rationale", "zero_means_off", "min", "max"}
        assert entry["class"] in {"guest", "runner", "protocol", "invariant"}, name
        if entry["class"] == "invariant":
            assert "env" not in entry, name
        else:
            assert entry["env"] == "SIDECAR_" + name.upper(), name
        spec = specs[name]
        assert spec.min is None or spec.min <= spec.default, name
        assert spec.max is None or spec.default <= spec.max, name
        assert spec.default > 0 or spec.zero_means_off, name
        rationale = entry["rationale"]
        assert rationale.endswith(".") and ". " not in rationale, f"{name}: one sentence"
        if spec.zero_means_off:
            assert "0 " in rationale, f"{name}: the rationale says what 0 (off) means"
        if spec.unit == "ms" and spec.limit_class != "invariant":
            assert spec.max is not None and spec.max <= timer_max, f"{name}: a timer beyond timer_max_ms"


def test_wheel_ships_the_inventory_inside_the_package():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]["config/limits.toml"] == (
        "sidecar/limits.toml"
    )


GOOD = """
[[limit]]
name = "vm_widgets"
class = "guest"
env = "SIDECAR_VM_WIDGETS"
default = 4
unit = "count"
zero_means_off = false
rationale = "Why."
"""


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (('default = 4', 'default = 0'), "default is zero"),
        (('default = 4', 'default = -4'), "negative"),
        (('default = 4', 'default = "4 MiB"'), "unit"),
        (('default = 4', 'default = 4\nmin = 8'), "below the minimum"),
        (('default = 4', 'default = 4\nmin = 2\nmax = 1'), "above the maximum"),
        (('class = "guest"', 'class = "vm"'), "unknown class"),
        (('unit = "count"', 'unit = "furlongs"'), "unknown unit"),
        (('env = "SIDECAR_VM_WIDGETS"', 'env = "VM_WIDGETS"'), "env must be"),
        (('rationale = "Why."', ''), "missing rationale"),
        (('rationale = "Why."', 'rationale = "Why."\ncolour = "red"'), "unknown keys colour"),
        (('zero_means_off = false', 'zero_means_off = "no"'), "true or false"),
        (('name = "vm_widgets"', 'name = "VM-Widgets"'), "bad limit name"),
        (('name = "vm_widgets"', 'name = "rows"'), "bad limit name"),
        (('class = "guest"\nenv = "SIDECAR_VM_WIDGETS"', 'class = "invariant"\nenv = "SIDECAR_VM_WIDGETS"'),
         "env must be None"),
    ],
)
def test_malformed_inventories_fail_loudly(tmp_path, change, complaint):
    path = tmp_path / "limits.toml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(InventoryError, match=complaint):
        load_inventory(path)


def test_duplicate_and_empty_inventories_fail(tmp_path):
    path = tmp_path / "limits.toml"
    path.write_text(GOOD + GOOD)
    with pytest.raises(InventoryError, match="duplicate limits: vm_widgets"):
        load_inventory(path)
    path.write_text("")
    with pytest.raises(InventoryError, match=r"\[\[limit\]\]"):
        load_inventory(path)
    path.write_text("[[limit]\n")
    with pytest.raises(InventoryError):
        load_inventory(path)


# ── environment ──────────────────────────────────────────────────────────────────────────────


def test_no_environment_gives_every_default_silently():
    with capture_logs() as logs:
        limits = load_limits({})
    assert logs == []
    for name, (_, default) in EXPECTED.items():
        assert getattr(limits, name) == default
        assert limits.source(name) == "default"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SIDECAR_VM_MEMORY_BYTES", "64MiB", 64 * MIB),
        ("SIDECAR_VM_MEMORY_BYTES", "64 MiB", 64 * MIB),
        ("SIDECAR_VM_MEMORY_BYTES", "  64MiB\n", 64 * MIB),
        ("SIDECAR_VM_MEMORY_BYTES", "67108864", 64 * MIB),
        ("SIDECAR_VM_MEMORY_BYTES", "67_108_864", 64 * MIB),
        ("SIDECAR_VM_MEMORY_BYTES", "65536 KiB", 64 * MIB),
        ("SIDECAR_VM_MEMORY_BYTES", "0.5GiB", 512 * MIB),
        ("SIDECAR_VM_MEMORY_BYTES", "1 GiB", 1 << 30),
        ("SIDECAR_VM_MEMORY_BYTES", "131072B", 128 << 10),
        ("SIDECAR_RUNNER_CACHE_BYTES", "1TiB", 1 << 40),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "45s", 45000),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "1.5 s", 1500),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "2min", 120000),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "1h", 3600000),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "250ms", 250),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "250", 250),
        ("SIDECAR_RUNNER_VMS", "5_000", 5000),
        ("SIDECAR_RUNNER_WORKER_THREADS", "1024", 1024),
        ("SIDECAR_PROTOCOL_COMPLETED_IDS", "16", 16),
    ],
)
def test_valid_values_win(variable, value, expected):
    name = variable.removeprefix("SIDECAR_").lower()
    with capture_logs() as logs:
        limits = load_limits({variable: value})
    assert getattr(limits, name) == expected
    assert limits.source(name) == "env"
    assert logs == []


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("SIDECAR_VM_MEMORY_BYTES", "", "empty"),
        ("SIDECAR_VM_MEMORY_BYTES", "   ", "empty"),
        ("SIDECAR_VM_MEMORY_BYTES", "0", "zero"),
        ("SIDECAR_VM_MEMORY_BYTES", "0 MiB", "zero"),
        ("SIDECAR_VM_MEMORY_BYTES", "-1", "negative"),
        ("SIDECAR_VM_MEMORY_BYTES", "-5MiB", "negative"),
        ("SIDECAR_VM_MEMORY_BYTES", "lots", "not a number"),
        ("SIDECAR_VM_MEMORY_BYTES", "1e6", "not a number"),
        ("SIDECAR_VM_MEMORY_BYTES", "0x100000", "not a number"),
        ("SIDECAR_VM_MEMORY_BYTES", "64 M iB", "not a number"),
        ("SIDECAR_VM_MEMORY_BYTES", "1 000", "not a number"),
        ("SIDECAR_VM_MEMORY_BYTES", "+64MiB", "not a number"),
        ("SIDECAR_VM_MEMORY_BYTES", "64MB", "ambiguous: vm_memory_bytes takes one of B, KiB, MiB, GiB, TiB"),
        ("SIDECAR_VM_MEMORY_BYTES", "64M", "ambiguous"),
        ("SIDECAR_VM_MEMORY_BYTES", "64k", "ambiguous"),
        ("SIDECAR_VM_MEMORY_BYTES", "64mib", "unknown unit 'mib'"),
        ("SIDECAR_VM_MEMORY_BYTES", "30s", "wrong kind"),
        ("SIDECAR_VM_MEMORY_BYTES", "1.5B", "not a whole number"),
        ("SIDECAR_VM_MEMORY_BYTES", "32KiB", "below the minimum 64 KiB"),
        ("SIDECAR_VM_MEMORY_BYTES", "5GiB", "above the maximum 4 GiB"),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "1MiB", "wrong kind"),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "5m", "ambiguous: vm_call_timeout_ms takes one of ms, s, min, h"),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "٣٠", "not a number"),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "9" * 5000, "too long"),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "1_" * 3000 + "1", "too long"),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "30sec", "unknown unit 'sec'"),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "0.5ms", "not a whole number"),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "25d", "unknown unit"),
        ("SIDECAR_VM_CALL_TIMEOUT_MS", "2147483648", "above the maximum"),
        ("SIDECAR_RUNNER_VMS", "5MiB", "wrong kind"),
        ("SIDECAR_RUNNER_VMS", "10vms", "a bare number"),
        ("SIDECAR_RUNNER_VMS", "2.5", "not a whole number"),
        ("SIDECAR_RUNNER_WORKER_THREADS", "1025", "above the maximum 1024"),
        ("SIDECAR_PROTOCOL_COMPLETED_IDS", "15", "below the minimum 16"),
        ("SIDECAR_RUNNER_MODULE_BYTES", "99999999999 TiB", "above the maximum"),
        # Lengths the guest ABI reports as i32: one more than its largest would turn negative.
        ("SIDECAR_VM_INPUT_BYTES", "2GiB", "above the maximum 2147483647 B"),
        ("SIDECAR_VM_HOST_CALL_BYTES", "2147483648", "above the maximum 2147483647 B"),
    ],
)
def test_bad_values_fall_back_to_the_default_and_warn_naming_the_variable(variable, value, reason):
    name = variable.removeprefix("SIDECAR_").lower()
    with capture_logs() as logs:
        limits = load_limits({variable: value})
    assert getattr(limits, name) == EXPECTED[name][1]
    assert limits.source(name) == "default"
    [warning] = ignored(logs)
    assert warning["log_level"] == "warning"
    assert warning["variable"] == variable
    assert warning["value"] == value
    assert warning["default"] == EXPECTED[name][1]
    assert reason in warning["reason"]


@pytest.mark.parametrize("name", sorted(ZERO_MEANS_OFF))
def test_zero_means_off_where_the_entry_says_so(name):
    with capture_logs() as logs:
        limits = load_limits({"SIDECAR_" + name.upper(): "0"})
    assert getattr(limits, name) == 0
    assert limits.source(name) == "env"
    assert logs == []


def test_zero_means_off_entries_still_refuse_negatives():
    with capture_logs() as logs:
        limits = load_limits({"SIDECAR_VM_FUEL": "-1"})
    assert limits.vm_fuel == 0 and limits.source("vm_fuel") == "default"
    assert ignored(logs)[0]["reason"] == "negative"


def test_invariants_ignore_the_environment_but_say_so():
    with capture_logs() as logs:
        limits = load_limits({"SIDECAR_WASM_PAGE_BYTES": "4096", "SIDECAR_TIMER_MAX_MS": "1"})
    assert limits.wasm_page_bytes == 65536 and limits.timer_max_ms == 2147483647
    assert limits.source("wasm_page_bytes") == "default"
    assert {entry["variable"] for entry in ignored(logs)} == {"SIDECAR_WASM_PAGE_BYTES", "SIDECAR_TIMER_MAX_MS"}
    assert all("invariant" in entry["reason"] for entry in ignored(logs))


def test_several_bad_variables_each_warn_and_good_ones_still_apply():
    with capture_logs() as logs:
        limits = load_limits({"SIDECAR_VM_FUEL": "x", "SIDECAR_RUNNER_VMS": "", "SIDECAR_VM_TABLES": "3"})
    assert limits.vm_tables == 3
    assert sorted(entry["variable"] for entry in ignored(logs)) == ["SIDECAR_RUNNER_VMS", "SIDECAR_VM_FUEL"]


def test_process_limits_reads_the_environment_once(monkeypatch):
    process_limits.cache_clear()
    monkeypatch.setenv("SIDECAR_RUNNER_VMS", "7")
    try:
        first = process_limits()
        monkeypatch.setenv("SIDECAR_RUNNER_VMS", "8")
        assert process_limits() is first and first.runner_vms == 7
    finally:
        process_limits.cache_clear()


@given(st.sampled_from(load_inventory()), st.integers(min_value=1, max_value=2**62))
def test_formatted_values_parse_back(spec: LimitSpec, value: int):
    assume(spec.limit_class != "invariant" and (spec.min or 1) <= value <= (spec.max or 2**63 - 1))
    variable = "SIDECAR_" + spec.name.upper()
    assert getattr(load_limits({variable: format_value(spec, value)}), spec.name) == value


def test_format_value_picks_the_largest_exact_unit():
    specs = {spec.name: spec for spec in load_inventory()}
    assert format_value(specs["protocol_frame_bytes"], 16 * MIB) == "16 MiB"
    assert format_value(specs["protocol_frame_bytes"], 16 * MIB + 1) == "16777217 B"
    assert format_value(specs["vm_call_timeout_ms"], 90000) == "90 s"
    assert format_value(specs["vm_call_timeout_ms"], 120000) == "2 min"
    assert format_value(specs["vm_call_timeout_ms"], 0) == "0 ms"
    assert format_value(specs["runner_vms"], 1000) == "1000"


# ── the Limits object ───────────────────────────────────────────────────────────────────────


def test_limits_are_frozen_attributes():
    limits = load_limits({})
    assert limits.protocol_frame_bytes == 16 * MIB
    assert "vm_fuel" in dir(limits)
    with pytest.raises(AttributeError, match="frozen"):
        limits.vm_fuel = 5  # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        del limits.vm_fuel
    with pytest.raises(AttributeError, match="no limit named 'vm_nonsense'"):
        _ = limits.vm_nonsense
    with pytest.raises(KeyError, match="vm_nonsense"):
        limits.spec("vm_nonsense")
    with pytest.raises(KeyError):
        limits.source("vm_nonsense")


def test_spec_exposes_the_inventory_entry():
    spec = load_limits({}).spec("vm_recycle_after_calls")
    assert (spec.limit_class, spec.env, spec.unit, spec.zero_means_off) == (
        "guest", "SIDECAR_VM_RECYCLE_AFTER_CALLS", "calls", True,
    )
    assert load_limits({}).spec("timer_max_ms").env is None


def test_rows_are_json_ready_in_inventory_order():
    limits = load_limits({"SIDECAR_VM_STACK_BYTES": "2MiB"})
    rows = limits.rows()
    assert [row["name"] for row in rows] == list(EXPECTED)
    assert json.loads(json.dumps(rows)) == rows
    by_name = {row["name"]: row for row in rows}
    assert by_name["vm_stack_bytes"] == {
        "name": "vm_stack_bytes", "class": "guest", "env": "SIDECAR_VM_STACK_BYTES", "default": MIB,
        "value": 2 * MIB, "source": "env", "unit": "bytes",
    }
    assert by_name["wasm_page_bytes"]["env"] is None


# ── tightening for vm.create ────────────────────────────────────────────────────────────────


def test_tightening_lowers_guest_budgets_and_marks_them_vm():
    base = load_limits({})
    vm = base.tightened({"vm_memory_bytes": "32 MiB", "vm_call_timeout_ms": 500, "vm_output_bytes": 1024.0})
    assert (vm.vm_memory_bytes, vm.vm_call_timeout_ms, vm.vm_output_bytes) == (32 * MIB, 500, 1024)
    assert vm.source("vm_memory_bytes") == "vm" and vm.source("vm_stack_bytes") == "default"
    assert base.vm_memory_bytes == 128 * MIB and base.source("vm_memory_bytes") == "default"
    assert vm.tightened({}).rows() == vm.rows()


def test_the_ceiling_itself_is_allowed():
    vm = load_limits({}).tightened({"vm_memory_bytes": 128 * MIB})
    assert vm.vm_memory_bytes == 128 * MIB and vm.source("vm_memory_bytes") == "vm"


def test_raising_above_the_ceiling_is_a_limit_error_naming_the_limit():
    base = load_limits({"SIDECAR_VM_MEMORY_BYTES": "64MiB"})
    with capture_logs() as logs, pytest.raises(LimitExceededError) as caught:
        base.tightened({"vm_memory_bytes": "128MiB"})
    error = caught.value
    assert error.code == ErrorCode.LIMIT_EXCEEDED
    assert error.data == {
        "kind": "limit_exceeded", "limit": "vm_memory_bytes", "env": "SIDECAR_VM_MEMORY_BYTES",
        "capacity": 64 * MIB, "observed": 128 * MIB,
    }
    assert "SIDECAR_VM_MEMORY_BYTES" in error.message and "64 MiB" in error.message
    assert logs[0]["event"] == "limit_exhausted" and logs[0]["limit"] == "vm_memory_bytes"


def test_a_tightened_value_is_the_next_ceiling():
    vm = load_limits({}).tightened({"vm_output_bytes": "1 MiB"})
    with capture_logs(), pytest.raises(LimitExceededError) as caught:
        vm.tightened({"vm_output_bytes": "2 MiB"})
    assert caught.value.data["capacity"] == MIB


@pytest.mark.parametrize(
    ("overrides", "path", "complaint"),
    [
        ({"vm_nonsense": 1}, "$.limits.vm_nonsense", "unknown limit"),
        ({"runner_module_bytes": 1024}, "$.limits.runner_module_bytes", "runner limit"),
        ({"protocol_frame_bytes": 4096}, "$.limits.protocol_frame_bytes", "protocol limit"),
        ({"wasm_page_bytes": 65536}, "$.limits.wasm_page_bytes", "invariant limit"),
        ({"vm_memory_bytes": -1}, "$.limits.vm_memory_bytes", "negative"),
        ({"vm_memory_bytes": 0}, "$.limits.vm_memory_bytes", "zero"),
        ({"vm_memory_bytes": "lots"}, "$.limits.vm_memory_bytes", "not a number"),
        ({"vm_memory_bytes": "1s"}, "$.limits.vm_memory_bytes", "wrong kind"),
        ({"vm_memory_bytes": 1024}, "$.limits.vm_memory_bytes", "below the minimum"),
        ({"vm_memory_bytes": True}, "$.limits.vm_memory_bytes", "not a whole number"),
        ({"vm_memory_bytes": 1.5}, "$.limits.vm_memory_bytes", "not a whole number"),
        ({"vm_memory_bytes": None}, "$.limits.vm_memory_bytes", "not a whole number"),
        ({"vm_memory_bytes": [1]}, "$.limits.vm_memory_bytes", "not a whole number"),
    ],
)
def test_bad_overrides_are_invalid_params_with_the_path(overrides, path, complaint):
    with pytest.raises(InvalidParamsError, match=complaint) as caught:
        load_limits({}).tightened(overrides)
    assert caught.value.data["path"] == path


def test_overrides_must_be_an_object():
    with pytest.raises(InvalidParamsError) as caught:
        load_limits({}).tightened([("vm_fuel", 1)])  # type: ignore[arg-type]
    assert caught.value.data["path"] == "$.limits"


def test_zero_means_off_turning_off_is_a_raise_when_the_ceiling_is_on():
    base = load_limits({})
    with capture_logs(), pytest.raises(LimitExceededError) as caught:
        base.tightened({"vm_recycle_after_calls": 0})
    assert caught.value.data["capacity"] == 512 and caught.value.data["observed"] == 0
    assert "SIDECAR_VM_RECYCLE_AFTER_CALLS=0" in caught.value.message
    assert base.tightened({"vm_recycle_after_calls": 100}).vm_recycle_after_calls == 100


def test_zero_means_off_any_value_narrows_an_off_ceiling():
    base = load_limits({"SIDECAR_VM_RECYCLE_MEMORY_BYTES": "0"})
    assert base.vm_fuel == 0  # unmetered by default
    vm = base.tightened({"vm_fuel": 10**9, "vm_recycle_memory_bytes": "16 GiB"})
    assert vm.vm_fuel == 10**9 and vm.vm_recycle_memory_bytes == 16 << 30
    still_off = base.tightened({"vm_fuel": 0})
    assert still_off.vm_fuel == 0 and still_off.source("vm_fuel") == "vm"
    with capture_logs(), pytest.raises(LimitExceededError):
        vm.tightened({"vm_fuel": 0})


# ── when a bound bites ──────────────────────────────────────────────────────────────────────


def test_exceeded_builds_the_error_and_logs_how_full():
    limits = load_limits({"SIDECAR_VM_OUTPUT_BYTES": "1000"})
    with capture_logs() as logs:
        error = limits.exceeded("vm_output_bytes", 1500, vm_id="vm-1")
    assert isinstance(error, LimitExceededError)
    assert error.data == {
        "kind": "limit_exceeded", "limit": "vm_output_bytes", "env": "SIDECAR_VM_OUTPUT_BYTES",
        "capacity": 1000, "observed": 1500, "vm_id": "vm-1",
    }
    assert "SIDECAR_VM_OUTPUT_BYTES" in error.message
    assert logs == [{
        "event": "limit_exhausted", "log_level": "warning", "limit": "vm_output_bytes", "class": "guest",
        "observed": 1500, "capacity": 1000, "fill_percent": 150.0, "env": "SIDECAR_VM_OUTPUT_BYTES",
        "source": "env", "vm_id": "vm-1",
    }]


def test_exceeded_takes_an_explicit_capacity_and_message():
    limits = load_limits({})
    with capture_logs() as logs:
        error = limits.exceeded("vm_call_timeout_ms", 900, capacity=800, message="call ran out of time")
    assert error.message == "call ran out of time"
    assert error.data["capacity"] == 800
    assert logs[0]["fill_percent"] == 112.5


def test_exceeded_on_a_vm_limit_points_at_vm_create_and_the_ceiling():
    vm = load_limits({}).tightened({"vm_input_bytes": 100})
    with capture_logs():
        error = vm.exceeded("vm_input_bytes", 101)
    assert "vm.create" in error.message and "SIDECAR_VM_INPUT_BYTES" in error.message


def test_exceeded_on_an_invariant_names_no_variable():
    with capture_logs() as logs:
        error = load_limits({}).exceeded("timer_max_ms", 2**40)
    assert error.data["env"] is None
    assert "SIDECAR_" not in error.message
    assert logs[0]["env"] is None


def test_exhausted_only_logs():
    limits = load_limits({})
    with capture_logs() as logs:
        assert limits.exhausted("protocol_frame_bytes", 20 * MIB, stream="stdin") is None
    assert logs == [{
        "event": "limit_exhausted", "log_level": "warning", "limit": "protocol_frame_bytes", "class": "protocol",
        "observed": 20 * MIB, "capacity": 16 * MIB, "fill_percent": 125.0, "env": "SIDECAR_PROTOCOL_FRAME_BYTES",
        "source": "default", "stream": "stdin",
    }]


def test_fill_percent_is_none_without_a_capacity():
    with capture_logs() as logs:
        load_limits({}).exhausted("vm_fuel", 10)
    assert logs[0]["fill_percent"] is None


def test_limits_repr_shows_what_differs_from_defaults():
    assert repr(load_limits({})) == "Limits(defaults)"
    assert repr(load_limits({"SIDECAR_VM_TABLES": "2"})) == "Limits(vm_tables=2)"


def test_limits_constructor_is_usable_from_specs():
    spec = LimitSpec("vm_widgets", "guest", "SIDECAR_VM_WIDGETS", 3, "count", "Why.")
    limits = Limits({"vm_widgets": spec}, {"vm_widgets": 3}, {"vm_widgets": "default"})
    assert limits.vm_widgets == 3
