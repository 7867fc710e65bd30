"""Build hook: compiles the one C extension, `sidecar/wasmffi/_native.c` (the guest ABI's data
calls as native host functions; see its header for why).

It needs a C compiler (`$CC`, else the one Python was built with) and the Python headers. The
module lands next to its source, which is where an editable install imports it from, and a
wheel takes it from there. The source's SHA-256 is compiled in, so `sidecar.wasmffi.native`
can refuse a build that no longer matches the source beside it (an edit without a rebuild).

`SIDECAR_NATIVE_SANITIZE=address` builds it instrumented for CI instead (`.ci/run`): with clang
(`$CC` overrides), whose AddressSanitizer runtime the tests then preload, since the Python that
loads the module is not instrumented. Never a build to ship: it does not load without that runtime.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("sidecar/wasmffi/_native.c")


class NativeBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        source = Path(self.root) / SOURCE
        built = source.with_name("_native" + sysconfig.get_config_var("EXT_SUFFIX"))
        compile_extension(source, built)
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":  # the module is ignored by git, so the wheel is told to take it
            build_data["force_include"][str(built)] = str(SOURCE.with_name(built.name))


def compile_extension(source: Path, built: Path) -> None:
    sanitize = os.environ.get("SIDECAR_NATIVE_SANITIZE")
    if sanitize:  # frame pointers and debug info: reports name our lines; -O1 keeps them readable
        default, flags = "clang", [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g", "-O1"]
    else:
        default, flags = sysconfig.get_config_var("CC") or "cc", ["-O2"]
    compiler = shlex.split(os.environ.get("CC") or default)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    partial = built.with_name(built.name + ".partial")
    command = [
        *compiler, "-shared", "-fPIC", *flags, "-Wall", f"-I{sysconfig.get_paths()['include']}",
        f'-DSIDECAR_SOURCE_SHA256="{digest}"', str(source), "-o", str(partial),
    ]
    if sys.platform == "darwin":
        command[1:1] = ["-undefined", "dynamic_lookup"]
    try:
        subprocess.run(command, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(
            f"building {source.name} failed ({exc}): wasm-sidecar needs a C compiler (gcc or cc, or $CC) "
            f"and the Python {sys.version_info.major}.{sys.version_info.minor} headers to install"
        ) from exc
    os.replace(partial, built)  # never a half-written module where Python imports it
