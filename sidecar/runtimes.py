"""Sidecar-provided guests (runtimes): where their recipes are, where they are installed, which are.

Owns the data directory (`SIDECAR_DATA_DIR`, else `$XDG_DATA_HOME/wasm-sidecar`, else
`~/.local/share/wasm-sidecar`), the layout under it (`runtimes/<name>/` with the runtime's
`manifest.json`), finding a runtime's build recipe (inside the package in a wheel, at the
repository's `runtimes/<name>/` in a checkout) and installing a runtime by running that recipe.
A runtime is installed when its manifest and the outputs it names are there; installing again
is a no-op when the recipe has not changed (the recipe checks that itself). Knows nothing about
VMs: what a runtime's guest needs (its preopen, its exports) is in its manifest.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .logs import log

DATA_DIR_ENV = "SIDECAR_DATA_DIR"
PYTHON = "python"  # the runtime `vm.eval` and the MCP tools run code in
KNOWN = (PYTHON,)
_PACKAGE = Path(__file__).resolve().parent


class RuntimeUnavailable(Exception):
    """A runtime that cannot be installed or used; the message says what to do."""


@dataclass(frozen=True)
class InstalledRuntime:
    name: str
    version: str
    preimported: list[str]
    directory: Path  # what the guest sees read-only at `guest_path`
    guest_path: str
    module: Path
    manifest: dict[str, Any]
    module_id: str  # the module's id as the manifest records it: a bake found by it skips reading the module

    @property
    def files_id(self) -> str:
        """Names the installed files by content (their hashes, as the manifest records them)."""
        import hashlib  # only a Python VM needs it; `initialize` lists runtimes before any

        return hashlib.sha256(json.dumps(self.manifest["outputs"], sort_keys=True).encode()).hexdigest()


def data_dir() -> Path:
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "wasm-sidecar"


def install_dir(name: str, root: Path | None = None) -> Path:
    if name not in KNOWN:  # a name becomes a path: only the known ones may
        raise RuntimeUnavailable(f"unknown runtime {name!r}; known: {', '.join(KNOWN)}")
    return (root or data_dir()) / "runtimes" / name


def recipe(name: str) -> Path:
    """The directory holding `build.py` for `name`: in the wheel, or in the repository."""
    for candidate in (_PACKAGE / "runtime_recipes" / name, _PACKAGE.parent / "runtimes" / name):
        if (candidate / "build.py").is_file():
            return candidate
    raise RuntimeUnavailable(f"no build recipe for runtime {name!r} in this installation")


def find(name: str, root: Path | None = None) -> InstalledRuntime | None:
    """The installed runtime `name`, or None if it is not (completely) installed or not known."""
    if name not in KNOWN:
        return None
    directory = install_dir(name, root)
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        outputs: dict[str, Any] = manifest["outputs"]
        # Sizes, not hashes: a half-written install is what this must catch, cheaply, at every start.
        complete = all((directory / path).stat().st_size == output["bytes"] for path, output in outputs.items())
        module_path = next(path for path in outputs if path.endswith(".wasm"))
        runtime = InstalledRuntime(name, str(manifest[f"{name}_version"]), list(manifest.get("preimported", [])),
                                   directory, str(manifest["guest"]["preopen"]), directory / module_path, manifest,
                                   "sha256:" + str(outputs[module_path]["sha256"]))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None
    return runtime if complete else None


def installed(root: Path | None = None) -> list[InstalledRuntime]:
    return [runtime for name in KNOWN if (runtime := find(name, root)) is not None]


def install(
    name: str, *, root: Path | None = None, work_dir: Path | None = None, force: bool = False
) -> InstalledRuntime:
    """Build (or rebuild, with `force`) runtime `name` into the data directory. The recipe's work
    files go to `work_dir`, else to a temporary directory removed afterwards."""
    import subprocess  # only installing needs these: `initialize` lists runtimes on a cold start
    import tempfile

    target = install_dir(name, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    build = recipe(name) / "build.py"
    with tempfile.TemporaryDirectory(prefix=f"wasm-sidecar-{name}-") as scratch:
        command = [sys.executable, str(build), "--out", str(target), "--work-dir", str(work_dir or scratch)]
        if force:
            command.append("--force")
        log.info("runtime_install_started", runtime=name, target=str(target))
        done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise RuntimeUnavailable(f"building runtime {name!r} failed (exit {done.returncode}); its output is above")
    runtime = find(name, root)
    if runtime is None:
        raise RuntimeUnavailable(f"runtime {name!r} was built but its manifest or outputs are missing in {target}")
    return runtime
