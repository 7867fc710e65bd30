"""The generated schema and the written spec stay in step with the wire types.

The committed `protocol/schema.json` must equal what the code generates, and `protocol/SPEC.md`
must document every method, field and error code the code has, with examples that decode.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from protocol import schema
from protocol.errors import ErrorCode, RpcError
from protocol.mcp import MCP_METHODS
from protocol.methods import METHODS, decoder_for, params_decoder

SPEC = (Path(schema.__file__).with_name("SPEC.md")).read_text(encoding="utf-8")
HOST_TO_SIDECAR, SIDECAR_TO_HOST = "→ ", "← "
MCP_SECTION = "The MCP front: `wasm-sidecar mcp`"  # its examples are MCP's messages, not this contract's


def test_committed_schema_matches_the_code() -> None:
    committed = schema.SCHEMA_PATH.read_text(encoding="utf-8")
    assert json.loads(committed) == schema.build_schema(), "run: python -m protocol.schema"
    assert committed == schema.render(schema.build_schema())


def test_check_flags_a_stale_file_and_write_fixes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "schema.json"
    monkeypatch.setattr(schema, "SCHEMA_PATH", target)
    assert schema.main(["--check"]) == 1  # missing
    target.write_text("{}\n")
    assert schema.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert schema.main([]) == 0
    assert schema.main(["--check"]) == 0
    assert target.read_text().endswith("}\n")


def test_methods_map_names_every_method_and_resolves() -> None:
    doc = schema.build_schema()
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["methods"].keys() == METHODS.keys()
    for name, entry in doc["methods"].items():
        spec = METHODS[name]
        assert entry["params"] == {"$ref": f"#/$defs/{spec.params.__name__}"}
        assert entry["direction"] == spec.direction and entry["summary"] == spec.summary
        assert ("result" in entry) != spec.notification
        for ref in (entry["params"], entry.get("result", {})):
            if "$ref" in ref:
                assert ref["$ref"].removeprefix("#/$defs/") in doc["$defs"]
    assert doc["methods"]["host.call"]["result"] == {}  # any JSON


def test_envelope_schema_says_what_the_wire_requires() -> None:
    defs = schema.build_schema()["$defs"]
    for name in ("Request", "Notification", "Response"):
        assert "jsonrpc" in defs[name]["required"]
        assert defs[name]["properties"]["jsonrpc"] == {"const": "2.0"}
    checked = {rule["if"]["properties"]["method"]["const"] for rule in defs["Request"]["allOf"]}
    assert checked == METHODS.keys()


def _sections() -> dict[str, str]:
    """SPEC.md split at its `##` and `###` headings, keyed by heading text."""
    parts = re.split(r"^#{2,3} (.+)$", SPEC, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _fields(struct: Any) -> list[str]:
    return [field.encode_name for field in msgspec.structs.fields(struct)]


def _documented(name: str, text: str) -> bool:
    return re.search(rf"`{re.escape(name)}\??`", text) is not None


@pytest.mark.parametrize("method", sorted(METHODS))
def test_spec_documents_every_method_and_field(method: str) -> None:
    spec = METHODS[method]
    assert re.search(rf"^\| `{re.escape(method)}` \|.*\| {re.escape(spec.summary)} \|$", SPEC, re.MULTILINE)
    section = _sections()[f"`{method}`"]
    for struct in (spec.params, spec.result):
        if isinstance(struct, type) and issubclass(struct, msgspec.Struct):
            missing = [name for name in _fields(struct) if not _documented(name, section)]
            assert not missing, f"SPEC.md section `{method}` lacks {missing}"


def test_spec_documents_every_nested_field() -> None:
    nested = {name: body for name, body in schema.build_schema()["$defs"].items() if "properties" in body}
    for envelope in ("Request", "Notification", "Response", "ErrorObject"):
        del nested[envelope]
    fields = {f"{name}.{field}": field for name, body in nested.items() for field in body["properties"]}
    assert {where for where, field in fields.items() if not _documented(field, SPEC)} == set()


def test_spec_lists_every_error_code_and_kind() -> None:
    table = _sections()["Errors"]
    for code in ErrorCode:
        assert re.search(rf"^\| {int(code)} \| `(\w+)` \|", table, re.MULTILINE), code
    kinds = {cls.kind for cls in _subclasses(RpcError)}
    assert {kind for kind in kinds if f"`{kind}`" not in table} == set()


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def _examples() -> list[tuple[str, str, Any]]:
    return [
        (heading, line[:2], json.loads(line[2:]))
        for heading, text in _sections().items()
        for line in text.splitlines()
        if line.startswith((HOST_TO_SIDECAR, SIDECAR_TO_HOST))
    ]


def test_every_method_has_an_example() -> None:
    shown = {message["method"] for heading, _, message in _examples() if "method" in message and heading != MCP_SECTION}
    assert shown == METHODS.keys()


def test_mcp_examples_are_valid_mcp_messages() -> None:
    """Each request's params decode as its MCP method's, and each answer as that request's result."""
    asked: dict[Any, str] = {}
    examples = [(direction, message) for heading, direction, message in _examples() if heading == MCP_SECTION]
    assert examples
    for direction, message in examples:
        assert message["jsonrpc"] == "2.0"
        if "method" in message:
            assert direction == HOST_TO_SIDECAR
            spec = MCP_METHODS[message["method"]]
            assert ("id" in message) != spec.notification
            decoder_for(spec.params).decode(json.dumps(message.get("params", {})))
            asked[message.get("id")] = spec.name
        else:
            assert direction == SIDECAR_TO_HOST
            msgspec.json.decode(json.dumps(message["result"]), type=MCP_METHODS[asked[message["id"]]].result)


@pytest.mark.parametrize(("heading", "direction", "message"),
                         [example for example in _examples() if example[0] != MCP_SECTION])
def test_spec_examples_are_valid_messages(heading: str, direction: str, message: dict[str, Any]) -> None:
    assert message["jsonrpc"] == "2.0"
    if "method" in message:
        spec = METHODS[message["method"]]
        assert direction == (HOST_TO_SIDECAR if spec.direction == "host_to_sidecar" else SIDECAR_TO_HOST)
        assert ("id" in message) != spec.notification
        params = params_decoder(spec.name).decode(json.dumps(message.get("params", {})))
        spec.check(params)
    elif "error" in message:
        assert message["error"]["code"] in set(ErrorCode)
        assert "kind" in message["error"]["data"]
    elif direction == SIDECAR_TO_HOST:  # a result of the method whose section it is in
        result_type = METHODS[heading.strip("`")].result
        msgspec.json.decode(json.dumps(message["result"]), type=result_type)


def test_descriptions_do_not_depend_on_msgspecs_docstring_handling() -> None:
    # msgspec 0.23 began trimming docstring indentation and 0.22 did not: the schema cleans them itself.
    descriptions = [body["description"] for body in schema.build_schema()["$defs"].values() if "description" in body]
    assert descriptions
    assert [text for text in descriptions if re.search(r"^[ \t]", text, re.MULTILINE)] == []
