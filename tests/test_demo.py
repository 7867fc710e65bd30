"""The README's demo host runs end to end against a real sidecar process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .support import WAIT

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo_host.py"


def test_demo_host_greets_survives_faults_and_restores_elsewhere() -> None:
    done = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=WAIT * 3)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "greet('Ada') -> 'Good " in out and "(greeting #1)" in out and "(greeting #3)" in out
    assert "add(2**40, 2) -> 1099511627778" in out
    assert "crash() -> error -32003 trap" in out
    assert "spin() -> error -32004 timeout" in out
    assert "in a second sidecar process: 'Good " in out and "(greeting #4)" in out


def test_the_readme_python_host_example_runs(python_runtime) -> None:
    readme = (DEMO.parents[1] / "README.md").read_text(encoding="utf-8")
    example = re.search(r"### From Python.*?```python\n(.*?)```", readme, re.S)
    assert example is not None, "README.md has a python block under 'From Python'"
    done = subprocess.run([sys.executable, "-c", example[1]], capture_output=True, text=True, timeout=WAIT * 3,
                          env={**os.environ, "SIDECAR_LOG_LEVEL": "error"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[5]", "'evening'", "'kept'"]
