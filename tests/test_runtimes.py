"""`wasm-sidecar runtime`: what counts as installed, the list, and an install that is a no-op when up to date."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from sidecar import runtimes

from .guests import refused, rpc
from .support import installed_python_runtime, process_session


def cli(*args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({runtimes.DATA_DIR_ENV: str(data_dir)} if data_dir else {})}
    return subprocess.run([sys.executable, "-m", "sidecar", "runtime", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def fake_install(root: Path, *, module_bytes: bytes = b"\0asm", declared: int | None = None) -> Path:
    """A runtime directory as the recipe leaves it: outputs, and a manifest naming their sizes and hashes."""
    target = runtimes.install_dir("python", root)
    (target / "lib").mkdir(parents=True)
    (target / "python.wasm").write_bytes(module_bytes)
    (target / "lib" / "python311.zip").write_bytes(b"zip")
    manifest = {
        "runtime": "python", "python_version": "3.11.8+", "preimported": ["json"], "guest": {"preopen": "/python"},
        "outputs": {"python.wasm": {"bytes": len(module_bytes) if declared is None else declared,
                                    "sha256": hashlib.sha256(module_bytes).hexdigest()},
                    "lib/python311.zip": {"bytes": 3, "sha256": hashlib.sha256(b"zip").hexdigest()}},
    }
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_nothing_installed_is_said_plainly(tmp_path: Path) -> None:
    done = cli("list", data_dir=tmp_path)
    assert done.returncode == 0 and "no runtimes installed" in done.stdout and str(tmp_path) in done.stdout
    assert json.loads(cli("list", "--json", data_dir=tmp_path).stdout) == []


def test_a_complete_install_is_listed_with_its_manifest(tmp_path: Path) -> None:
    target = fake_install(tmp_path)
    [row] = json.loads(cli("list", "--json", data_dir=tmp_path).stdout)
    assert row == {"name": "python", "version": "3.11.8+", "preimported": ["json"], "directory": str(target)}
    found = runtimes.find("python", tmp_path)
    assert found is not None and found.module == target / "python.wasm" and found.guest_path == "/python"
    assert found.module_id == "sha256:" + hashlib.sha256(b"\0asm").hexdigest()  # as the manifest records it


def test_a_half_written_install_is_not_installed(tmp_path: Path) -> None:
    fake_install(tmp_path, declared=1 << 20)  # the manifest promises more than the file holds
    assert runtimes.find("python", tmp_path) is None
    assert json.loads(cli("list", "--json", data_dir=tmp_path).stdout) == []


def test_an_unknown_runtime_is_refused_by_name() -> None:
    done = cli("install", "cobol")
    assert done.returncode == 2 and "invalid choice: 'cobol'" in done.stderr


def test_installing_what_is_installed_is_a_no_op() -> None:
    installed = installed_python_runtime()
    before = {path: path.stat().st_mtime_ns for path in installed.directory.rglob("*") if path.is_file()}
    done = cli("install", "python")
    assert done.returncode == 0, done.stderr
    assert f"python {installed.version} installed in {installed.directory}" in done.stdout
    assert {path: path.stat().st_mtime_ns for path in installed.directory.rglob("*") if path.is_file()} == before


def test_a_runtime_reinstalled_with_other_files_is_baked_anew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bake is cached by its preinit spec, which names directories by path: the spec must also
    name the runtime's files by content, or a reinstall in place would reuse a stale bake."""
    from protocol.methods import VmCreateParams
    from sidecar.evals import runtime_create_params

    monkeypatch.setenv(runtimes.DATA_DIR_ENV, str(tmp_path))
    specs = []
    for content in (b"\0asm-one", b"\0asm-two"):
        target = fake_install(tmp_path, module_bytes=content)
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["outputs"]["python.wasm"]["sha256"] = content.hex()
        (target / "manifest.json").write_text(json.dumps(manifest))
        specs.append(runtime_create_params(VmCreateParams(runtime="python"))[0].preinit)
        shutil.rmtree(target)
    assert specs[0].wasi.preopens == specs[1].wasi.preopens and specs[0] != specs[1]


def test_a_module_that_is_not_the_one_its_manifest_names_is_not_baked(tmp_path: Path) -> None:
    """The manifest's hash names the runtime's module, so a bake found by it is used without
    reading the module; the module is read, and must match, only when a bake is made."""
    target = fake_install(tmp_path, module_bytes=b"\0asm\x01\0\0\0")
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["outputs"]["python.wasm"]["sha256"] = "0" * 64
    (target / "manifest.json").write_text(json.dumps(manifest))

    async def create() -> None:
        async with process_session(env={**os.environ, runtimes.DATA_DIR_ENV: str(tmp_path)}) as (client, _):
            error = await refused(client, "vm.create", {"runtime": "python"}, code=-32602)
            assert "manifest" in error.message and "sha256:" + "0" * 64 in error.message, error.message
            assert await rpc(client, "ping") == {}

    anyio.run(create)
