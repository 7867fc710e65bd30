"""`wasm-sidecar limits`: the table, JSON, the README section, the audit's exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

import sidecar.limits_cli as limits_cli
from sidecar.limits import load_inventory, load_limits
from sidecar.limits_cli import main, render_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- limits:begin -->", "<!-- limits:end -->"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The operator's own SIDECAR_* variables must not leak into expectations."""
    for variable in list(os.environ):
        if variable.startswith("SIDECAR_"):
            monkeypatch.delenv(variable)


def test_default_output_is_an_aligned_table_of_values_in_effect(monkeypatch, capsys):
    monkeypatch.setenv("SIDECAR_VM_FUEL", "5000")
    assert main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "class", "value", "source", "env", "unit"]
    assert len(lines) == 1 + len(load_inventory())
    columns = [lines[0].index(title) for title in ("class", "value", "source", "env", "unit")]
    for line in lines[1:]:
        assert all(line[column - 2 : column] == "  " and line[column] != " " for column in columns), line
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["vm_fuel"] == ["vm_fuel", "guest", "5000", "env", "SIDECAR_VM_FUEL", "fuel"]
    assert rows["vm_recycle_after_calls"][2] == "512"
    assert rows["runner_cache_bytes"][2:4] == ["2", "GiB"]
    assert rows["wasm_page_bytes"] == ["wasm_page_bytes", "invariant", "64", "KiB", "default", "-", "bytes"]


def test_zero_that_means_off_reads_as_off(monkeypatch, capsys):
    monkeypatch.setenv("SIDECAR_RUNNER_CACHE_BYTES", "0")
    assert main([]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("runner_cache_bytes")]
    assert "0 (off)" in line


def test_json_is_the_rows_as_data(monkeypatch, capsys):
    monkeypatch.setenv("SIDECAR_VM_STACK_BYTES", "2MiB")
    assert main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == load_limits().rows()
    assert set(rows[0]) == {"name", "class", "env", "default", "value", "source", "unit"}
    assert {row["name"]: row["source"] for row in rows}["vm_stack_bytes"] == "env"


def test_env_warnings_go_to_stderr_not_into_the_json(monkeypatch, capsys):
    monkeypatch.setenv("SIDECAR_RUNNER_VMS", "plenty")
    before = structlog.get_config()
    assert main(["--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)
    assert "limit_env_ignored" in captured.err and "SIDECAR_RUNNER_VMS" in captured.err
    assert structlog.get_config() == before, "the caller's logging setup is restored"


def test_markdown_renders_the_inventory(capsys):
    assert main(["--markdown"]) == 0
    out = capsys.readouterr().out
    assert out == render_markdown(load_inventory())
    assert "| `vm_fuel` | guest | 0 (off) | 0 = off | `SIDECAR_VM_FUEL` |" in out
    assert "| `vm_memory_bytes` | guest | 128 MiB | min 64 KiB, max 4 GiB |" in out
    assert "| `timer_max_ms` | invariant | 2147483647 ms | - | - |" in out


def test_markdown_does_not_depend_on_the_environment(monkeypatch):
    before = render_markdown(load_inventory())
    monkeypatch.setenv("SIDECAR_VM_FUEL", "5000")
    assert render_markdown(load_inventory()) == before


def test_readme_limits_block_matches_the_inventory():
    text = README.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "README.md needs one limits block"
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert block.strip() == render_markdown(load_inventory()).strip(), (
        "README limits block is stale: replace the text between the markers with the output of "
        "`python -m sidecar.limits_cli --markdown`"
    )


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [(["--bogus"], "unrecognized arguments"), (["--json", "--markdown"], "not allowed with"), (["table"], "")],
)
def test_bad_usage_exits_2_with_usage(argv, complaint, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: wasm-sidecar limits" in err and complaint in err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "--audit" in capsys.readouterr().out


def test_audit_prints_offenders_and_fails(monkeypatch, capsys):
    monkeypatch.setattr(limits_cli, "audit", lambda: ["sidecar/x.py:3: MAX_WIDGETS ...", "vm_widgets: never read"])
    assert main(["--audit"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["sidecar/x.py:3: MAX_WIDGETS ...", "vm_widgets: never read"]
    assert "2 offender(s)" in captured.err


def test_clean_audit_passes(monkeypatch, capsys):
    monkeypatch.setattr(limits_cli, "audit", lambda: [])
    assert main(["--audit"]) == 0
    assert capsys.readouterr().out == ""


def test_runs_as_a_real_process():
    env = {key: value for key, value in os.environ.items() if not key.startswith("SIDECAR_")}
    env |= {"SIDECAR_VM_MEMORY_BYTES": "64 MiB", "SIDECAR_PROTOCOL_FRAME_BYTES": "16MB"}
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.limits_cli", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["vm_memory_bytes"]["value"] == 64 << 20 and rows["vm_memory_bytes"]["source"] == "env"
    assert rows["protocol_frame_bytes"]["source"] == "default"
    warning = json.loads(done.stderr.splitlines()[0])
    assert warning["event"] == "limit_env_ignored" and warning["variable"] == "SIDECAR_PROTOCOL_FRAME_BYTES"
