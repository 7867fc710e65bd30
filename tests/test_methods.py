"""The method registry and wire types: every design method present, strict decoding, one-of rules."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec
import pytest

from protocol.errors import InvalidParamsError, MethodNotFoundError
from protocol.methods import (
    METHODS,
    Capabilities,
    DroppedResponses,
    Empty,
    EvalError,
    EvalResult,
    ExportInfo,
    ImportInfo,
    InitializeResult,
    LimitRow,
    LimitsResult,
    ModuleLoadParams,
    ModuleLoadResult,
    PeerInfo,
    PendingHostCall,
    Recycles,
    RuntimeInfo,
    StatsResult,
    VmCallResult,
    VmCreateResult,
    VmInfo,
    VmListResult,
    VmRestoreResult,
    VmRunResult,
    VmSnapshotResult,
    params_decoder,
    require_one_of,
)
from sidecar.limits import load_limits

MODULE_ID = "sha256:" + "ab" * 32
WASM = base64.b64encode(b"\0asm\1\0\0\0").decode()

DESIGN_TABLE = {
    "initialize": "host_to_sidecar",
    "ping": "host_to_sidecar",
    "shutdown": "host_to_sidecar",
    "module.load": "host_to_sidecar",
    "vm.create": "host_to_sidecar",
    "vm.call": "host_to_sidecar",
    "vm.run": "host_to_sidecar",
    "vm.snapshot": "host_to_sidecar",
    "vm.restore": "host_to_sidecar",
    "vm.eval": "host_to_sidecar",
    "vm.dispose": "host_to_sidecar",
    "vm.hibernate": "host_to_sidecar",
    "vm.list": "host_to_sidecar",
    "sidecar.stats": "host_to_sidecar",
    "sidecar.limits": "host_to_sidecar",
    "$/cancelRequest": "host_to_sidecar",
    "host.call": "sidecar_to_host",
    "vm.output": "sidecar_to_host",
}

# A valid params object per method, using every field where that is legal.
VALID: dict[str, dict[str, Any]] = {
    "initialize": {"protocol_version": 1, "client": {"name": "host", "version": "2.0"}},
    "ping": {},
    "shutdown": {},
    "module.load": {"wasm_base64": WASM},
    "vm.create": {
        "module_id": MODULE_ID,
        "mode": "stateless",
        "limits": {"vm_memory_bytes": "64MiB", "vm_fuel": 0},
        "wasi": {
            "args": ["prog"],
            "env": {"A": "1"},
            "preopens": [{"host_path": "/d", "guest_path": "/", "writable": True}],
        },
    },
    "vm.call": {"vm_id": "v1", "export": "add", "args": [1, -2, 2.5], "input_base64": "AAE=", "timeout_ms": 0},
    "vm.run": {"vm_id": "v1", "args": ["-c", "1"], "env": {"X": "y"}, "stdin": "hi", "timeout_ms": 50, "stream": True},
    "vm.snapshot": {"vm_id": "v1", "path": "/tmp/v1.snap", "format": "wasm"},
    "vm.restore": {"path": "/tmp/v1.snap", "limits": {"vm_call_timeout_ms": 100}},
    "vm.eval": {"vm_id": "v1", "code": "x = 1\nx + 1", "stdin": "line\n", "timeout_ms": 100},
    "vm.dispose": {"vm_id": "v1"},
    "vm.hibernate": {"vm_id": "v1"},
    "vm.list": {},
    "sidecar.stats": {},
    "sidecar.limits": {},
    "$/cancelRequest": {"id": "req-7"},
    "host.call": {"vm_id": "v1", "method": "kv.get", "params": {"key": "a"}},
    "vm.output": {"vm_id": "v1", "stream": "stderr", "data": "warn\n", "request_id": 4},
}

# One bad field per method: (params, the path msgspec must report).
WRONG_TYPE: dict[str, tuple[dict[str, Any], str]] = {
    "initialize": ({"client": {"name": 3}}, "$.client.name"),
    "module.load": ({"wat": ["(module)"]}, "$.wat"),
    "vm.create": ({"wat": "(module)", "wasi": {"preopens": [{"host_path": "/", "guest_path": "/", "writable": "yes"}]}},
                  "$.wasi.preopens[0].writable"),
    "vm.call": ({"vm_id": "v1", "export": "f", "args": [1, True]}, "$.args[1]"),
    "vm.run": ({"vm_id": "v1", "env": {"A": 1}}, "$.env[...]"),
    "vm.snapshot": ({"vm_id": 1, "path": "/p"}, "$.vm_id"),
    "vm.restore": ({"path": "/p", "limits": {"vm_fuel": [1]}}, "$.limits[...]"),
    "vm.eval": ({"vm_id": "v1", "code": 1}, "$.code"),
    "vm.dispose": ({"vm_id": None}, "$.vm_id"),
    "vm.hibernate": ({"vm_id": 7}, "$.vm_id"),
    "$/cancelRequest": ({"id": 1.5}, "$.id"),
    "host.call": ({"vm_id": "v1", "method": 7, "params": None}, "$.method"),
    "vm.output": ({"vm_id": "v1", "stream": "stdin", "data": ""}, "$.stream"),
}  # fmt: skip

# Constraints the design makes clear, each refused with the path of the field.
OUT_OF_RANGE = [
    ("vm.create", {"module_id": "sha256:ABC"}, "$.module_id"),
    ("vm.create", {"wat": "(module)", "mode": "shared"}, "$.mode"),
    ("vm.create", {"runtime": "cobol"}, "$.runtime"),
    ("vm.call", {"vm_id": "v1", "export": "f", "timeout_ms": -1}, "$.timeout_ms"),
    ("vm.call", {"vm_id": "v1", "export": "f", "input_base64": "not base64!"}, "$.input_base64"),
    ("vm.call", {"vm_id": "", "export": "f"}, "$.vm_id"),
    ("vm.snapshot", {"vm_id": "v1", "path": "/p", "format": "zip"}, "$.format"),
    ("initialize", {"protocol_version": 0}, "$.protocol_version"),
]


def decode(method: str, params: dict[str, Any]) -> Any:
    return params_decoder(method).decode(json.dumps(params).encode())


def test_registry_matches_the_design_table() -> None:
    assert {name: spec.direction for name, spec in METHODS.items()} == DESIGN_TABLE
    notifications = {name for name, spec in METHODS.items() if spec.notification}
    assert notifications == {"$/cancelRequest", "vm.output"}
    assert all((spec.result is None) == spec.notification for spec in METHODS.values())
    assert all(spec.summary and "\n" not in spec.summary for spec in METHODS.values())


def test_every_method_has_a_valid_example() -> None:
    assert VALID.keys() == METHODS.keys()


@pytest.mark.parametrize("method", sorted(VALID))
def test_valid_params_decode_and_pass_their_check(method: str) -> None:
    params = decode(method, VALID[method])
    assert isinstance(params, METHODS[method].params)
    METHODS[method].check(params)
    # Round trip: what decodes encodes back to the same value.
    again = params_decoder(method).decode(msgspec.json.encode(params))
    assert again == params


@pytest.mark.parametrize("method", sorted(VALID))
def test_unknown_field_is_refused(method: str) -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `bogus`"):
        decode(method, {**VALID[method], "bogus": 1})


def test_unknown_nested_field_names_its_path() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"unknown field `bogus` - at `\$\.wasi`"):
        decode("vm.create", {"wat": "(module)", "wasi": {"bogus": 1}})


@pytest.mark.parametrize("method", sorted(WRONG_TYPE))
def test_wrong_type_names_the_path(method: str) -> None:
    params, path = WRONG_TYPE[method]
    with pytest.raises(msgspec.ValidationError) as info:
        decode(method, params)
    assert str(info.value).endswith(f" - at `{path}`")


@pytest.mark.parametrize(("method", "params", "path"), OUT_OF_RANGE)
def test_constraints_name_the_path(method: str, params: dict[str, Any], path: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        decode(method, params)
    assert str(info.value).endswith(f" - at `{path}`")


def test_missing_required_field_is_named() -> None:
    with pytest.raises(msgspec.ValidationError, match="missing required field `export`"):
        decode("vm.call", {"vm_id": "v1"})


def test_base64_fields_arrive_as_bytes() -> None:
    assert decode("module.load", {"wasm_base64": WASM}).wasm_base64 == b"\0asm\1\0\0\0"


def test_defaults_fill_in_and_are_left_out_on_output() -> None:
    params = decode("vm.create", {"wat": "(module)", "wasi": {}})
    assert params.mode == "stateful" and params.wasi.preopens == []
    assert msgspec.json.decode(msgspec.json.encode(params)) == {"wat": "(module)", "wasi": {}}


def test_decoders_are_shared_per_params_type() -> None:
    assert params_decoder("ping") is params_decoder("vm.list") is params_decoder("sidecar.stats")
    assert params_decoder("vm.call") is params_decoder("vm.call")
    assert params_decoder("ping").decode(b"{}") == Empty()


def test_unknown_method_is_method_not_found() -> None:
    with pytest.raises(MethodNotFoundError) as info:
        params_decoder("vm.explode")
    assert info.value.to_wire()["code"] == -32601


class TestOneOf:
    def test_exactly_one_given_passes(self) -> None:
        require_one_of(ModuleLoadParams(wat="(module)"), ("path", "wasm_base64", "wat"))

    def test_none_given_names_every_field(self) -> None:
        with pytest.raises(InvalidParamsError) as info:
            require_one_of(ModuleLoadParams(), ("path", "wasm_base64", "wat"), path="$.source")
        error = info.value.to_wire()
        assert error["code"] == -32602
        assert error["data"] == {"kind": "invalid_params", "path": "$.source", "one_of": ["path", "wasm_base64", "wat"]}
        assert "`path`, `wasm_base64`, `wat`" in error["message"]

    def test_two_given_points_at_the_second(self) -> None:
        with pytest.raises(InvalidParamsError, match="got path, wat") as info:
            require_one_of(ModuleLoadParams(path="/m.wasm", wat="(module)"), ("path", "wasm_base64", "wat"))
        assert info.value.data["path"] == "$.wat"

    def test_optional_group_allows_none(self) -> None:
        require_one_of(ModuleLoadParams(), ("path", "wat"), required=False)

    @pytest.mark.parametrize(
        ("method", "params", "path"),
        [
            ("module.load", {}, "$"),
            ("vm.create", {"module_id": MODULE_ID, "wat": "(module)"}, "$.wat"),
            ("vm.create", {"mode": "stateless"}, "$"),
            ("vm.call", {"vm_id": "v", "export": "f", "input": "a", "input_base64": "YQ=="}, "$.input_base64"),
            ("vm.run", {"vm_id": "v", "stdin": "a", "stdin_base64": "YQ=="}, "$.stdin_base64"),
            ("vm.output", {"vm_id": "v", "stream": "stdout"}, "$"),
        ],
    )
    def test_method_checks(self, method: str, params: dict[str, Any], path: str) -> None:
        decoded = decode(method, params)  # decoding alone accepts it: the rule spans fields
        with pytest.raises(InvalidParamsError) as info:
            METHODS[method].check(decoded)
        assert info.value.data["path"] == path

    def test_optional_inputs_may_be_absent(self) -> None:
        METHODS["vm.call"].check(decode("vm.call", {"vm_id": "v", "export": "f"}))
        METHODS["vm.run"].check(decode("vm.run", {"vm_id": "v"}))


ROW = LimitRow(
    name="vm_memory_bytes", class_="guest", env="SIDECAR_VM_MEMORY_BYTES",
    default=134217728, value=67108864, source="env", unit="bytes",
)  # fmt: skip

RESULTS: dict[str, Any] = {
    "initialize": InitializeResult(
        protocol_version=1,
        server=PeerInfo(name="wasm-sidecar", version="0.1.0"),
        capabilities=Capabilities(methods=sorted(METHODS), guest_abi=1, snapshot_formats=["state", "wasm"],
                                  runtimes=[RuntimeInfo(name="python", version="3.11.8+", preimported=["json"])]),
        limits=[ROW],
    ),
    "ping": Empty(),
    "shutdown": Empty(),
    "module.load": ModuleLoadResult(
        module_id=MODULE_ID, size_bytes=8, cached=False, compile_ms=1.25,
        exports=[ExportInfo(name="add", kind="func", params=["i32", "i32"], results=["i32"]),
                 ExportInfo(name="memory", kind="memory")],
        imports=[ImportInfo(module="sidecar", name="input_len", kind="func", params=[], results=["i32"])],
    ),
    "vm.create": VmCreateResult(vm_id="v1"),
    "vm.call": VmCallResult(results=[3, 0.5], output_base64=b"\xff", elapsed_ms=0.02, fuel_used=10),
    "vm.run": VmRunResult(exit_code=0, stdout="ok\n", stderr="", stdout_truncated=False, stderr_truncated=True,
                          elapsed_ms=3.0),
    "vm.snapshot": VmSnapshotResult(path="/tmp/v1.snap", size_bytes=4096, sha256="0" * 64),
    "vm.restore": VmRestoreResult(vm_id="v2",
                                  pending_host_calls=[PendingHostCall(id="s-1", method="kv.get", params=[1])]),
    "vm.eval": EvalResult(status="error", stdout="", stderr="", elapsed_ms=0.4,
                          error=EvalError(type="ZeroDivisionError", message="division by zero", traceback="...")),
    "vm.dispose": Empty(),
    "vm.hibernate": Empty(),
    "vm.list": VmListResult(vms=[VmInfo(vm_id="v1", mode="stateful", module_id=MODULE_ID, state="idle",
                                        memory_bytes=65536, calls=2, instances=1, host_calls_pending=0,
                                        recycles=Recycles(calls=1, memory=0, trap=0, rewound=0), resident=True,
                                        last_used="2026-12-05T03:00:00.000Z")]),
    "sidecar.stats": StatsResult(requests_served=5, requests_in_flight=1, host_calls_pending=0, engines=1, vms=1,
                                 uptime_ms=10, vms_starting=0, vm_calls=3, vm_memory_bytes=65536,
                                 instances_recycled=Recycles(calls=1, memory=0, trap=0, rewound=0), hibernations=2,
                                 wakes=1, state_bytes=4096, state_quarantined=0, spare_instances=1,
                                 responses_dropped=DroppedResponses(stale=1, duplicate=0, unmatched=2)),
    "sidecar.limits": LimitsResult(limits=[ROW]),
}  # fmt: skip


def test_every_result_type_has_an_example() -> None:
    expected = {name for name, spec in METHODS.items() if spec.result not in (None, Any)}
    assert RESULTS.keys() == expected
    assert all(type(RESULTS[name]) is METHODS[name].result for name in RESULTS)


@pytest.mark.parametrize("method", sorted(RESULTS))
def test_results_round_trip_without_envelope_noise(method: str) -> None:
    result = RESULTS[method]
    wire = msgspec.json.encode(result)
    assert b"jsonrpc" not in wire
    assert msgspec.json.decode(wire, type=type(result)) == result


def test_limit_row_uses_class_on_the_wire() -> None:
    wire = msgspec.json.decode(msgspec.json.encode(ROW))
    assert wire["class"] == "guest" and "class_" not in wire
    with pytest.raises(msgspec.ValidationError, match="class_"):
        msgspec.json.decode(json.dumps({**wire, "class_": "guest"}), type=LimitRow)


def test_optional_result_fields_are_omitted() -> None:
    wire = msgspec.json.decode(msgspec.json.encode(RESULTS["vm.call"]))
    assert wire == {"results": [3, 0.5], "output_base64": "/w==", "elapsed_ms": 0.02, "fuel_used": 10}


def test_the_inventory_rows_fit_the_wire_type() -> None:
    rows = load_limits({}).rows()
    decoded = msgspec.json.decode(msgspec.json.encode(rows), type=list[LimitRow])
    assert [row.name for row in decoded] == [row["name"] for row in rows]
    assert any(row.class_ == "invariant" and row.env is None for row in decoded)
