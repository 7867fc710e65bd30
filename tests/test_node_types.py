"""The Node.js client's generated types stay in step with the schema, as the schema does with the code.

`clients/node/src/protocol.ts` is generated from `protocol/schema.json` by
`clients/node/scripts/generate-types.mjs`; this runs its `--check`, so a wire change that
regenerates the schema but not the TypeScript types fails the suite. Needs `node` (CI has it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

GENERATOR = Path(__file__).resolve().parents[1] / "clients" / "node" / "scripts" / "generate-types.mjs"


def node() -> str:
    found = shutil.which("node")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("node is not on PATH; CI needs it for clients/node")
        pytest.skip("node is not on PATH")
    return found


def test_node_types_match_the_schema() -> None:
    check = subprocess.run([node(), GENERATOR, "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_the_check_fails_on_stale_types(tmp_path: Path) -> None:
    # A copy of the generator next to a schema with one more field: the committed types are stale for it.
    tree = tmp_path / "repo"
    (tree / "clients" / "node" / "scripts").mkdir(parents=True)
    (tree / "clients" / "node" / "src").mkdir()
    (tree / "protocol").mkdir()
    shutil.copy(GENERATOR, tree / "clients" / "node" / "scripts")
    shutil.copy(GENERATOR.parents[1] / "src" / "protocol.ts", tree / "clients" / "node" / "src")
    schema = (GENERATOR.parents[3] / "protocol" / "schema.json").read_text(encoding="utf-8")
    stale = schema.replace('"code": {', '"code_text": {', 1)  # a renamed field
    assert stale != schema
    (tree / "protocol" / "schema.json").write_text(stale, encoding="utf-8")
    copied = tree / "clients" / "node" / "scripts" / "generate-types.mjs"
    check = subprocess.run([node(), copied, "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    assert "out of date" in check.stderr and "npm run generate" in check.stderr
