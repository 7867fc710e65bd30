"""Command line: `wasm-sidecar` serves on stdio; `mcp` serves MCP on stdio; `limits ...` shows the
inventory; `runtime ...` installs and lists runtimes.

Owns argument parsing and process setup (logging, limits, stdio, the event loop). The daemon
itself is assembled in `sidecar.app`.
"""

from __future__ import annotations

import argparse
import sys

import anyio

from . import __version__, logs

USAGE = """wasm-sidecar [serve]           serve JSON-RPC 2.0 on stdin/stdout (the default)
       wasm-sidecar mcp               serve the Model Context Protocol on stdin/stdout (Python tools)
       wasm-sidecar limits [--json | --markdown | --audit]
       wasm-sidecar runtime install NAME [--work-dir DIR] [--force] | runtime list [--json]
       wasm-sidecar --version | --help"""


def _parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["limits"]:
        from .limits_cli import main as limits_main

        return limits_main(args[1:])
    if args[:1] == ["runtime"]:
        from .runtime_cli import main as runtime_main

        return runtime_main(args[1:])
    command = _parser().parse_args(args).command
    return serve(mcp=command == "mcp")


def serve(*, mcp: bool = False) -> int:
    """Serve on stdio until the session ends: the daemon's contract, or (`mcp`) MCP's."""
    from .app import build_mcp_server, build_server
    from .limits import process_limits
    from .transport import claim_stdio, nonblocking

    logs.configure()
    limits = process_limits()
    in_fd, out_fd = claim_stdio()
    build = build_mcp_server if mcp else build_server
    server = build(in_fd, out_fd, limits, handle_signals=True)
    with nonblocking(out_fd):
        return anyio.run(server.run)


if __name__ == "__main__":
    sys.exit(main())
