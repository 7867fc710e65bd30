"""The JSON Schema (draft 2020-12) of wire contract v1, generated from the wire types.

Owns turning the envelope types and the `METHODS` registry into one document, and keeping the
committed `protocol/schema.json` equal to it (`python -m protocol.schema [--check]`). The schema
validates a whole frame: a message or a batch, with each request's or notification's `params`
checked against its method's type. Knows nothing about prose (that is `SPEC.md`) or behaviour.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from .envelope import ErrorObject, Notification, Request, Response
from .methods import METHODS, MethodSpec

SCHEMA_PATH = Path(__file__).with_name("schema.json")
_REF = "#/$defs/{name}"


def build_schema() -> dict[str, Any]:
    types: list[Any] = [Request, Notification, Response, ErrorObject]
    for spec in METHODS.values():
        types += [spec.params] + ([] if spec.result is None else [spec.result])
    types = list(dict.fromkeys(types))
    refs, defs = msgspec.json.schema_components(types, ref_template=_REF)
    _normalize_descriptions(defs)
    ref = dict(zip(types, refs, strict=True))
    _tighten_envelope(defs)
    params_by_method = [
        {"if": {"properties": {"method": {"const": spec.name}}}, "then": {"properties": {"params": ref[spec.params]}}}
        for spec in METHODS.values()
    ]
    for name in ("Request", "Notification"):
        defs[name]["allOf"] = params_by_method
    messages = [ref[Request], ref[Notification], ref[Response]]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:wasm-sidecar:protocol:1",
        "title": "wasm-sidecar wire protocol v1",
        "description": "One frame: a JSON-RPC 2.0 message or a non-empty batch of them. `methods` lists "
        "each method's direction and the schemas of its params and result (absent for notifications).",
        "anyOf": [*messages, {"type": "array", "minItems": 1, "items": {"anyOf": messages}}],
        "methods": {spec.name: _method_entry(spec, ref) for spec in METHODS.values()},
        "$defs": defs,
    }


def _method_entry(spec: MethodSpec, ref: dict[Any, Any]) -> dict[str, Any]:
    entry = {
        "direction": spec.direction,
        "notification": spec.notification,
        "summary": spec.summary,
        "params": ref[spec.params],
    }
    if spec.result is not None:
        entry["result"] = ref[spec.result]
    if spec.one_of:
        entry["one_of"] = {"fields": list(spec.one_of), "required": spec.one_of_required}
    return entry


def _normalize_descriptions(defs: dict[str, Any]) -> None:
    """Clean docstring-derived descriptions ourselves, so the schema does not depend on whether a
    msgspec release trims their indentation (0.23 started to; earlier releases keep it)."""
    for body in defs.values():
        if "description" in body:
            body["description"] = inspect.cleandoc(body["description"])


def _tighten_envelope(defs: dict[str, Any]) -> None:
    """Say what the wire requires where the envelope types describe only what they encode.

    `jsonrpc` has a default for encoding yet every message must carry it, and `params`/`result`
    are `msgspec.Raw` until the method is known, which msgspec can only describe as "anything".
    """
    for name in ("Request", "Notification", "Response"):
        defs[name]["properties"]["jsonrpc"] = {"const": "2.0"}
        defs[name]["required"] = ["jsonrpc", *defs[name]["required"]]
    for name in ("Request", "Notification"):
        defs[name]["properties"]["params"] = {"type": ["object", "array"]}
    defs["Response"]["properties"]["result"] = {}
    defs["Response"]["oneOf"] = [{"required": ["result"]}, {"required": ["error"]}]


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocol.schema", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed schema.json is stale")
    args = parser.parse_args(argv)
    text = render(build_schema())
    if not args.check:
        SCHEMA_PATH.write_text(text, encoding="utf-8")
        return 0
    if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text(encoding="utf-8") != text:
        print(f"{SCHEMA_PATH} is out of date with the wire types; run: python -m protocol.schema", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
