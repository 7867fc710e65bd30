"""The guest side of `py_eval`: run a request's code in the session's namespace, answer in JSON.

Owns the request and result shapes, output capture, the value of a trailing expression, how an
exception or `SystemExit` is reported, and what each fresh interpreter does before its first
eval. Knows nothing about the bytes' transport (`_sidecar`, in entry.c) or about limits: the
sidecar bounds time, memory and output from outside, and a guest that exhausts one is discarded.

Request: `{"code": str, "stdin"?: str}`. Result (the fields of `vm.eval`):
`{"status": "ok"|"error"|"exit", "value"?: str, "stdout": str, "stderr": str,
"error"?: {"type", "message", "traceback"}, "exit_code"?: int}`.
"""

from __future__ import annotations

import ast
import builtins
import collections
import gc
import importlib
import io
import json
import linecache
import os
import sys
import traceback

import _sidecar

# What py_init imports, so that an eval need not: the standard modules most snippets use, and
# `sidecar`. Not `random`'s state: see _first_eval.
PREIMPORTED = (
    "json", "re", "math", "datetime", "collections", "itertools", "functools", "dataclasses",
    "typing", "decimal", "statistics", "textwrap", "string", "sidecar",
)
# Sources of recent evals, kept so tracebacks and `inspect` can show their lines; older ones are
# dropped so that a long session does not keep every snippet it ever ran.
SOURCES_KEPT = 100

_namespace = sys.modules["__main__"].__dict__
_sources: collections.deque[str] = collections.deque()
_evals = 0
_fresh = True  # baked as True: every instance of a pre-initialized module starts fresh


def init() -> None:
    """Called once by py_init, before the interpreter's state is baked."""
    for name in PREIMPORTED:
        importlib.import_module(name)
    # No site module, so no exit()/quit(); snippets written for a REPL use them.
    builtins.exit = builtins.quit = sys.exit
    # The environment py_init ran with must not reach every instance; each reads its own.
    os.environ.clear()
    # Park everything made so far where the collector never looks: a full collection writes to
    # the header of every object it visits, copying baked pages into the instance (copy-on-write,
    # the case gc.freeze is documented for). Measured on baked instances: a first eval that runs a
    # full collection adds 1.05 MiB of private memory with this, 3.1 MiB without.
    gc.collect()
    gc.freeze()


def run() -> None:
    """py_eval: one request from the call's input, one result to its output."""
    global _fresh
    if _fresh:
        _fresh = False
        _first_eval()
    request = json.loads(_sidecar.read_input())
    result = evaluate(request["code"], request.get("stdin"))
    # Lone surrogates (print("\udc80")) cannot be UTF-8: they become "?" rather than fail the eval.
    _sidecar.write_output(json.dumps(result, ensure_ascii=False).encode("utf-8", "replace"))


def _first_eval() -> None:
    """What an interpreter learns from its own instance, not from the one py_init ran in."""
    os.environb.update(entry.partition(b"=")[::2] for entry in _sidecar.environ())
    # `statistics` imports `random`, whose module-level generator was seeded when py_init ran:
    # every instance would repeat that stream. Reseed from this instance's WASI random_get.
    if "random" in sys.modules:
        sys.modules["random"].seed()


class _Capture(io.StringIO):
    def close(self) -> None:
        """Code that closes sys.stdout must not take the eval's output with it."""


def evaluate(code: str, stdin: str | None) -> dict[str, object]:
    out, err = _Capture(), _Capture()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin or ""), out, err
    result: dict[str, object] = {"status": "ok"}
    filename = _remember(code)
    try:
        value = _execute(code, filename)
        if value is not None:
            result["value"] = repr(value)
    except SystemExit as exc:
        result["status"] = "exit"
        result["exit_code"] = _exit_code(exc.code)
    except BaseException as exc:  # every exception of the snippet is its result
        result["status"] = "error"
        result["error"] = _describe(exc, filename)
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    result["stdout"] = out.getvalue()
    result["stderr"] = err.getvalue()
    return result


def _remember(code: str) -> str:
    """A filename for this eval's code, with its source where linecache finds it."""
    global _evals
    _evals += 1
    filename = f"<eval-{_evals}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    _sources.append(filename)
    if len(_sources) > SOURCES_KEPT:
        linecache.cache.pop(_sources.popleft(), None)
    return filename


def _execute(code: str, filename: str) -> object:
    """Run the code; the value of its last statement if that is an expression (as a REPL shows)."""
    tree = ast.parse(code, filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, filename, "exec", dont_inherit=True), _namespace)
    if last is None:
        return None
    return eval(compile(ast.Expression(last.value), filename, "eval", dont_inherit=True), _namespace)


def _exit_code(code: object) -> int:
    """The status a process would exit with, printing a non-integer argument as CPython does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _describe(exc: BaseException, filename: str) -> dict[str, str]:
    # The snippet's frames start at its own module frame: the driver's frames above it, and
    # ast/compile frames of a snippet that never ran, are not the user's business.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):
        name = f"{kind.__module__}.{name}"
    try:
        message = str(exc)
    except Exception:  # a broken __str__ is the snippet's bug; traceback copes the same way
        message = "<exception str() failed>"
    return {"type": name, "message": message, "traceback": "".join(traceback.format_exception(kind, exc, tb))}
