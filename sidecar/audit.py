"""The limits audit: the inventory and the code must name the same bounds.

Owns the checks behind `wasm-sidecar limits --audit`, run over the Python sources of the
`sidecar` and `protocol` packages:
1. a limit-like constant (`MAX_*`, `*_MAX`, `*_LIMIT`, `*_BYTES`, `*TIMEOUT*`, `*_CAPACITY`,
   `DEFAULT_*`, module or class level, leading underscores ignored) has an inventory entry of
   the same name, lower-cased; values that cannot be a bound (text, flags, None, containers,
   negative literals such as status codes) are skipped;
2. every inventory entry is read somewhere outside the limits modules themselves: an attribute
   `x.<name>`, a string `"<name>"`, or, for an invariant, a constant of the same name;
3. such an invariant constant, when its value is a literal integer expression, equals the
   inventory default, so the documented invariant cannot drift from the code.
Knows nothing about values or the environment; it parses source text and never imports it.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import protocol
import sidecar

from .limits import LimitSpec, load_inventory

_LIMIT_LIKE = re.compile(r"^(MAX|DEFAULT)_|_(MAX|LIMIT|BYTES|CAPACITY)$|(^|_)TIMEOUT")
_CONSTANT = re.compile(r"[A-Z][A-Z0-9_]*")
# The limits modules name every entry themselves; counting those would make every entry "read".
_LIMITS_MODULES = frozenset({"limits.py", "audit.py", "limits_cli.py"})
_NOT_NUMBERS = (
    ast.Dict, ast.Set, ast.List, ast.Tuple, ast.DictComp, ast.SetComp, ast.ListComp, ast.GeneratorExp,
    ast.JoinedStr, ast.Lambda,
)
_INT_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow, ast.LShift: operator.lshift,
}


def audit(roots: Sequence[Path] | None = None, *, inventory: Sequence[LimitSpec] | None = None) -> list[str]:
    """Human-readable offenders, constants first (by file and line), then unread entries."""
    if roots is None:
        roots = [Path(sidecar.__file__).parent, Path(protocol.__file__).parent]
    specs = {spec.name: spec for spec in (load_inventory() if inventory is None else inventory)}
    offenders: list[str] = []
    read: set[str] = set()
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            # Runtime recipes ship inside an installed package but are build programs of their own,
            # run apart from the daemon: their constants bound no daemon work.
            if "__pycache__" in path.parts or "runtime_recipes" in path.parts:
                continue
            where = path.relative_to(Path(root).parent)
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            except (SyntaxError, UnicodeDecodeError) as exc:
                offenders.append(f"{where}: cannot be parsed for the audit ({exc})")
                continue
            if not (path.name in _LIMITS_MODULES and path.parent.name == "sidecar"):
                read |= _names_read(tree)
            for name, line, value in _constants(tree):
                spec = specs.get(name.lstrip("_").lower())
                if spec is None:
                    if _LIMIT_LIKE.search(name.lstrip("_")):
                        offenders.append(
                            f"{where}:{line}: {name} looks like a limit but the inventory has no entry "
                            f"{name.lstrip('_').lower()!r} (add it to config/limits.toml, or read an existing one)"
                        )
                    continue
                if spec.limit_class != "invariant":
                    continue
                read.add(spec.name)
                if value is not None and value != spec.default:
                    offenders.append(
                        f"{where}:{line}: {name} = {value} but the inventory says {spec.name} = {spec.default}"
                    )
    offenders.extend(
        f"{name}: inventory entry never read by the code (no `.{name}` or {name!r} outside the limits modules)"
        for name in specs
        if name not in read
    )
    return offenders


def _names_read(tree: ast.AST) -> set[str]:
    """Attribute names and string constants anywhere in the module."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


def _constants(node: ast.AST) -> Iterator[tuple[str, int, int | None]]:
    """(name, line, literal int value or None) of constant-cased module- and class-level assignments.

    Function bodies are skipped: a local is not a configuration constant.
    """
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(child, ast.Assign | ast.AnnAssign) and _may_be_limit(child.value):
            targets = child.targets if isinstance(child, ast.Assign) else [child.target]
            for target in targets:
                if isinstance(target, ast.Name) and _CONSTANT.fullmatch(target.id.lstrip("_")):
                    yield target.id, child.lineno, _literal_int(child.value)
        elif isinstance(child, ast.stmt):
            yield from _constants(child)


def _may_be_limit(value: ast.expr | None) -> bool:
    """False for what cannot be a bound: a bare annotation, text, flags, None, containers, codes.

    A negative literal is a status or error code (`STATUS_TIMEOUT = -2`), never a bound.
    """
    if value is None or any(isinstance(node, _NOT_NUMBERS) for node in ast.walk(value)):
        return False
    if isinstance(value, ast.Constant) and (isinstance(value.value, bool) or not isinstance(value.value, int | float)):
        return False
    number = _literal_int(value)
    return number is None or number >= 0


def _literal_int(node: ast.expr) -> int | None:
    """The value of an integer expression of literals (`64 * 1024`, `2**31 - 1`), else None."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, int) and not isinstance(node.value, bool) else None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        operand = _literal_int(node.operand)
        return None if operand is None else -operand
    if isinstance(node, ast.BinOp) and type(node.op) in _INT_OPERATORS:
        left, right = _literal_int(node.left), _literal_int(node.right)
        if left is None or right is None:
            return None
        # Keep the evaluation cheap and exact: no huge powers, no negative exponents, no division by 0.
        if isinstance(node.op, ast.Pow | ast.LShift) and not 0 <= right <= 64:
            return None
        if isinstance(node.op, ast.FloorDiv) and right == 0:
            return None
        return _INT_OPERATORS[type(node.op)](left, right)
    return None
