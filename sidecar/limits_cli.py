"""`wasm-sidecar limits`: the limits inventory for operators, the README, and the audit.

Owns presentation only: the aligned table of the values in effect, the same rows as JSON, the
README section (generated from the inventory so the docs cannot drift), and the audit's exit
status. Knows nothing about the daemon; `sidecar.cli` routes `limits ...` here, and
`python -m sidecar.limits_cli` runs it directly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence

import structlog

from . import logs
from .audit import audit
from .limits import Limits, LimitSpec, format_value, load_inventory, load_limits

_INTRO = """\
Every bound the sidecar enforces is in this table, generated from `config/limits.toml` by
`wasm-sidecar limits --markdown`; edit the inventory, not the table. `wasm-sidecar limits`
shows the values in effect and where each came from (`--json` for the same rows as data), and
the `sidecar.limits` method returns them to a host.

Classes: `guest` limits are per-VM budgets; the value in effect is a ceiling that `vm.create`
`limits` may lower for one VM, never raise. `runner` limits bound the trusted machinery that
works for guests and are never charged to a guest. `protocol` limits bound the wire.
`invariant` limits are fixed by a spec or the code: listed, not tunable.

Set a limit with its variable. A bare number is in the limit's unit; byte limits also take
`B`, `KiB`, `MiB`, `GiB`, `TiB` (`K`, `KB`, `M`, `MB`... are refused as ambiguous), time limits
`ms`, `s`, `min`, `h`, and counts take bare numbers only. `1_000`, `64 MiB` and `1.5GiB` are
fine. An empty, zero (unless 0 means off), negative, malformed or out-of-range value is
ignored: the default applies and a `limit_env_ignored` warning names the variable. Setting an
invariant's variable only logs that warning. When a limit bites, the `-32002` error (or
`-32004`, `-32008`) and the `limit_exhausted` log event name the limit, its capacity, what was
observed, and the variable that raises it.
"""


def main(argv: list[str]) -> int:
    """Exit status: 0, 1 when the audit finds offenders, 2 for bad usage."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage or help; the caller wants a status
        return exc.code if isinstance(exc.code, int) else 2
    if args.markdown:
        sys.stdout.write(render_markdown(load_inventory()))
        return 0
    if args.audit:
        offenders = audit()
        for offender in offenders:
            print(offender)
        print(f"limits audit: {len(offenders)} offender(s)", file=sys.stderr)
        return 1 if offenders else 0
    with _warnings_to_stderr():
        limits = load_limits()
    if args.json:
        print(json.dumps(limits.rows(), indent=2))
    else:
        sys.stdout.write(render_table(limits))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wasm-sidecar limits",
        description="Show every limit the sidecar enforces with the value in effect (from SIDECAR_* variables).",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="the rows as JSON: name, class, env, default, value, ...")
    output.add_argument("--markdown", action="store_true", help="the README limits section (defaults, rationale)")
    output.add_argument("--audit", action="store_true", help="check code against inventory; exit 1 on offenders")
    return parser


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Route `limit_env_ignored` to stderr for this run: stdout carries the table or the JSON.

    The previous structlog setup is restored so an embedding caller (or a test) keeps its own.
    """
    previous = structlog.get_config()
    logs.configure()
    try:
        yield
    finally:
        structlog.configure(**previous)


def _shown(spec: LimitSpec, value: int) -> str:
    return "0 (off)" if value == 0 and spec.zero_means_off else format_value(spec, value)


def render_table(limits: Limits) -> str:
    """Aligned text: one line per limit with the value in effect and its source."""
    header = ("name", "class", "value", "source", "env", "unit")
    lines = [header] + [
        (row["name"], row["class"], _shown(limits.spec(row["name"]), row["value"]), row["source"], row["env"] or "-",
         row["unit"])
        for row in limits.rows()
    ]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    aligned = ("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)
    return "".join(line.rstrip() + "\n" for line in aligned)


def render_markdown(inventory: Sequence[LimitSpec]) -> str:
    """The README section: prose on the rules, then the inventory with defaults and reasons."""
    lines = [
        _INTRO,
        "| limit | class | default | range | variable | why |",
        "|---|---|---|---|---|---|",
    ]
    for spec in inventory:
        bounds = [f"min {format_value(spec, spec.min)}"] if spec.min is not None else []
        bounds += [f"max {format_value(spec, spec.max)}"] if spec.max is not None else []
        bounds += ["0 = off"] if spec.zero_means_off else []
        cells = (
            f"`{spec.name}`", spec.limit_class, _shown(spec, spec.default), ", ".join(bounds) or "-",
            f"`{spec.env}`" if spec.env else "-", spec.rationale.replace("|", "\\|"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
