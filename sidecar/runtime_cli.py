"""`wasm-sidecar runtime`: install and list the sidecar-provided guests (runtimes).

Owns the command line of `sidecar.runtimes`: `runtime install NAME` (idempotent: exit 0 when the
runtime is there, built or already installed; a clear message and exit 1 when it cannot be
built) and `runtime list` (`--json` for data). Knows nothing about the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import logs
from .runtimes import KNOWN, RuntimeUnavailable, data_dir, install, installed


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="wasm-sidecar runtime", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("install", help="build a runtime into the data directory (a no-op when up to date)")
    add.add_argument("name", choices=KNOWN)
    add.add_argument("--work-dir", type=Path, help="keep the build's downloads and caches here (else a temporary dir)")
    add.add_argument("--force", action="store_true", help="rebuild even when the installed one is up to date")
    show = commands.add_parser("list", help="the runtimes installed in the data directory")
    show.add_argument("--json", action="store_true", help="as JSON")
    args = parser.parse_args(argv)
    logs.configure()
    if args.command == "install":
        try:
            runtime = install(args.name, work_dir=args.work_dir, force=args.force)
        except RuntimeUnavailable as exc:
            print(f"wasm-sidecar runtime install: {exc}", file=sys.stderr)
            return 1
        print(f"{runtime.name} {runtime.version} installed in {runtime.directory}")
        return 0
    rows = [{"name": r.name, "version": r.version, "preimported": r.preimported, "directory": str(r.directory)}
            for r in installed()]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no runtimes installed in {data_dir()}; install one with: wasm-sidecar runtime install python")
    else:
        for row in rows:
            print(f"{row['name']:<8} {row['version']:<10} {row['directory']}")
    return 0
