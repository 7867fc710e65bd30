"""The Docker build context: what `docker build .` sends is what the Dockerfile copies, not local state.

No Docker engine runs here, so this checks the two files against each other with Docker's
pattern rules as far as they matter: a leading path anchored at the context root, `*` within one
path segment, `**` across any number of them.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL_STATE = [".venv", "dist", "build/asan", ".git", "tests/assets/cache", "sidecar/__pycache__",
               "sidecar/wasmffi/_native.cpython-311-x86_64-linux-gnu.so", "runtimes/python/build",
               "runtimes/python/.work", ".pytest_cache", ".hypothesis", "clients/node/node_modules"]


def patterns() -> list[re.Pattern[str]]:
    compiled = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        regex = re.escape(line.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        compiled.append(re.compile(rf"{regex}(?:/.*)?"))
    return compiled


def ignored(path: str) -> bool:
    return any(pattern.fullmatch(path) for pattern in patterns())


def copied_sources() -> list[str]:
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--from") for word in words):
            sources += words[1:-1]
    return sources


def test_what_the_dockerfile_copies_is_in_the_context() -> None:
    sources = copied_sources()
    assert {"pyproject.toml", "sidecar", "protocol", "config", "runtimes"} <= set(sources)
    assert [source for source in sources if ignored(source)] == []


def test_local_state_stays_out_of_the_context() -> None:
    assert [path for path in LOCAL_STATE if not ignored(path)] == []
