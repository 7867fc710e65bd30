"""Command line: `wasm-sidecar` serves on stdio; `mcp` serves MCP on stdio; `limits ...` shows the
inventory; `runtime ...` installs and lists runtimes.

Owns argument parsing and process setup (logging, limits, stdio, the event loop, the state
directory's lock, the allocator's mmap threshold), and their order: a host sends `initialize` as
soon as it has spawned us, so the intake starts answering before anything the first answer does
not need is imported (structlog, asyncio beneath it, anyio, ctypes; `sidecar.logs` holds the log
events until structlog is set up). The daemon itself is assembled in `sidecar.app`.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from . import STATE_DIR_ENV, __version__, logs

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

USAGE = """wasm-sidecar [serve] [--state-dir DIR]  serve JSON-RPC 2.0 on stdin/stdout (the default)
       wasm-sidecar mcp [--state-dir DIR]      serve the Model Context Protocol on stdin/stdout (Python tools)
       wasm-sidecar limits [--json | --markdown | --audit]
       wasm-sidecar runtime install NAME [--work-dir DIR] [--force] | runtime list [--json]
       wasm-sidecar --version | --help"""
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
_MMAP_FROM = 128 << 10  # glibc's initial threshold, kept


def _parser() -> argparse.ArgumentParser:
    import argparse  # only when there are arguments to check: the plain daemon starts without it

    parser = argparse.ArgumentParser(
        prog="wasm-sidecar",
        usage=USAGE,
        description="Run untrusted WebAssembly guests for a host application, driven over stdin/stdout "
        "with JSON-RPC 2.0 (one message per line). Logs go to stderr "
        "(SIDECAR_LOG_FORMAT=json|console, SIDECAR_LOG_LEVEL=debug|info|warning|error).",
    )
    parser.add_argument("--version", action="version", version=f"wasm-sidecar {__version__}")
    parser.add_argument(
        "command", nargs="?", default="serve", choices=["serve", "mcp", "limits", "runtime"], help=argparse.SUPPRESS
    )
    parser.add_argument("--state-dir", help="where hibernated VMs (and mcp's sessions) live, kept across "
                        "restarts and locked by one process "
                        f"(default: ${STATE_DIR_ENV}, else a private directory removed at exit)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["limits"]:
        from .limits_cli import main as limits_main

        return limits_main(args[1:])
    if args[:1] == ["runtime"]:
        from .runtime_cli import main as runtime_main

        return runtime_main(args[1:])
    logs.hold()  # until `serve` has started serving: see the module docstring
    # A host's plain `wasm-sidecar` skips argparse (its import is part of every cold start).
    parsed = _parser().parse_args(args) if args else None
    state_dir = (parsed.state_dir if parsed else None) or os.environ.get(STATE_DIR_ENV) or None
    if state_dir is None:
        return serve(mcp=parsed is not None and parsed.command == "mcp")
    from pathlib import Path

    return serve(mcp=parsed is not None and parsed.command == "mcp", state_path=Path(state_dir))


def serve(*, mcp: bool = False, state_path: Path | None = None) -> int:
    """Serve on stdio until the session ends: the daemon's contract, or (`mcp`) MCP's; 2 when the
    state directory is another process's (or cannot be made)."""
    from .app import build_mcp_server, build_server
    from .limits import process_limits
    from .transport import claim_stdio, nonblocking

    try:
        limits = process_limits()
        state_dir = None
        if state_path is not None:
            from .state_dir import StateDir, StateDirBusy

            try:
                state_dir = StateDir(state_path, limits, "mcp" if mcp else "jsonrpc")
            except (StateDirBusy, OSError) as exc:
                logs.log.error("state_dir_unusable", state_dir=str(state_path), error=str(exc))
                logs.configure()
                return 2
        in_fd, out_fd = claim_stdio()
        build = build_mcp_server if mcp else build_server
        server = build(in_fd, out_fd, limits, handle_signals=True, state_dir=state_dir)
    except BaseException:
        logs.configure()  # not serving after all: what was logged goes out before the traceback
        raise
    with nonblocking(out_fd):
        server.start()  # the host's first requests are answered from here on
        logs.configure()
        _return_big_blocks_to_the_os()
        import anyio

        return anyio.run(server.run)


def _return_big_blocks_to_the_os() -> None:
    """Pin glibc's mmap threshold, so that every big block is its own mapping, returned when freed.

    glibc raises the threshold (up to 32 MiB) each time a big mapped block is freed, and from then
    on serves blocks that size from arenas it keeps. Hibernating and waking move a VM's state
    through big transient buffers (10-20 MiB for a Python session): 100 sessions under a resident
    cap of 10 held 202 MiB more than 10 sessions alone, and 23 MiB more with the threshold pinned
    (`benchmarks/bench_hibernate.py`, measure 4). Elsewhere than glibc, nothing to do.
    """
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM)
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
