"""The architecture in the imports: layers point down, no cycles, modules of one concept.

Reads the source of every module in `sidecar/` and `protocol/` (ast, never importing it) and
builds the import graph: module-level and function-level imports alike, and imports under
`if TYPE_CHECKING:` too, since a type-only back-edge still makes the lower module's meaning
depend on the higher one (the failure message marks them, as they are fixed differently).
A package's implicit import of its parents is not an edge: every module has it, and counting it
would make each package a cycle with its own `__init__`.

`LAYERS` below is the layer assignment, top first, as issue 12 states it: the entry points, the
server that wires everything, transport → intake → dispatch → services → vm → isolate → the
unsafe wasmtime edge and the binary format, with limits, logs and `protocol` below all of them.
A module may import its own layer (as long as no cycle forms) and any layer below it. Every
module of `sidecar/` must be in the table, and everything in the table must exist, so a new
module forces a decision here.

What imports cannot show: a callback handed down at run time (a higher layer's function stored
in a lower layer's object) is a call upward with no import; those are for review, not this test.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sidecar", "protocol")
MAX_LINES = 400

# Top first. Names are relative to `sidecar`; `__init__` is the package itself (`__version__`),
# and a subpackage's name covers all of its modules: each is one layer, self-contained below the rest.
LAYERS: list[tuple[str, frozenset[str]]] = [
    # Processes' entry points and the tools behind `wasm-sidecar limits` (the audit parses sources).
    ("entry", frozenset({"__main__", "cli", "limits_cli", "runtime_cli", "audit"})),
    # The daemon as assembled: which services, wired to the server with what.
    # `wiring` is the VM services' half, imported once the session serves (wasmtime is beneath it).
    ("app", frozenset({"app", "wiring"})),
    # Runs the daemon: transport, intake, dispatcher and services put together; session methods.
    # ... and the MCP front: the same server with MCP's session methods (`wasm-sidecar mcp`).
    ("server", frozenset({"server", "mcp_server"})),
    ("transport", frozenset({"transport"})),
    ("intake", frozenset({"intake"})),
    ("dispatch", frozenset({"dispatcher"})),
    # The method families: `module.load` and `vm.*` (vms), `vm.run` (runs), `vm.snapshot` /
    # `vm.restore`; and what they share: the checks before a VM exists, payload conventions.
    # The MCP front's tools (`mcp_tools`) are a service on top of `vms` and `evals`, their session
    # table (`mcp_sessions`) kept in the state directory; the session state they share with the front
    # (`mcp_session`) stands apart, light enough to load first; `hibernation` decides which VMs stay in memory.
    ("services", frozenset({"hibernation", "vms", "runs", "evals", "snapshot_service", "admission", "payloads",
                            "mcp_tools", "mcp_sessions", "mcp_session"})),
    # What works on isolates: the VM orders jobs on them (ending each through a `completion`, in
    # the WASI view of `wasi_view`), `snapshots` captures and restores one, `preinit` runs one
    # export in one and bakes the state into a module; `spares` makes instances ahead for new VMs.
    ("vm", frozenset({"vm", "job", "completion", "wasi_view", "snapshots", "preinit", "residency", "rewind",
                      "spares"})),
    # One store and instance; the guest ABI bound to it; `runtime`, the bundle an isolate is given.
    ("isolate", frozenset({"isolate", "guest_abi", "runtime"})),
    # What an isolate is built from and talks through, none of it aware of VMs. `modules` is the
    # module store, whose `CompiledModule` the VM and the isolate take: it sits here, below them,
    # while the `module.load` service that drives it is in `vms`.
    ("resources", frozenset({"hostcalls", "modules", "module_sources", "module_info", "module_bytes",
                             "compile_cache", "engines", "snapshot_file", "hostfiles", "runtimes", "state_dir"})),
    ("wasm", frozenset({"wasmffi", "wasmbin"})),
    ("foundation", frozenset({"limits", "logs", "__init__"})),
]
PROTOCOL_LAYER = len(LAYERS)  # below every layer of the daemon


@dataclass(frozen=True)
class Edge:
    source: str  # dotted module names
    target: str
    path: Path
    line: int
    type_only: bool

    def __str__(self) -> str:
        where = f"{self.path.relative_to(ROOT)}:{self.line}"
        return f"{where}: {self.source} -> {self.target}{' (TYPE_CHECKING)' if self.type_only else ''}"


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every Python module of the checked packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def extension_modules() -> set[str]:
    """C extensions, built from `<name>.c` beside the Python modules: importable, not parsed."""
    sources = (path for package in PACKAGES for path in (ROOT / package).rglob("*.c"))
    return {".".join(path.relative_to(ROOT).with_suffix("").parts) for path in sources}


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return name in modules and modules[name].name == "__init__.py"


def resolve(node: ast.ImportFrom, name: str, modules: dict[str, Path]) -> str:
    """The module a `from ... import` names: relative levels resolved against `name`'s package."""
    if node.level == 0:
        return node.module or ""
    package = name.split(".")
    if not is_package(name, modules):
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
            (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
            or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
        ):
            inside.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return inside


def import_edges() -> list[Edge]:
    modules = module_files()
    importable = modules.keys() | extension_modules()
    edges = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        type_only = type_checking_nodes(tree)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(node, name, modules)
                # `from pkg import sub` imports the submodule, `from pkg import name` the package (a
                # name that is also a submodule's, as `wasmbin.instrument`, counts as the submodule).
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in importable else base for a in node.names]
            for target in dict.fromkeys(targets):
                if target.split(".")[0] in PACKAGES and target != name:
                    edges.append(Edge(name, target, path, node.lineno, id(node) in type_only))
    return edges


def layer_of(module: str) -> int | None:
    """Index into `LAYERS` (larger is lower) by the longest table name that covers `module`."""
    if module.split(".")[0] == "protocol":
        return PROTOCOL_LAYER
    relative = module.split(".")[1:] or ["__init__"]
    for length in range(len(relative), 0, -1):
        prefix = ".".join(relative[:length])
        for index, (_, names) in enumerate(LAYERS):
            if prefix in names:
                return index
    return None


def layer_name(index: int) -> str:
    return "protocol" if index == PROTOCOL_LAYER else LAYERS[index][0]


def test_every_module_has_a_layer_and_every_table_entry_a_module() -> None:
    modules = module_files()
    unplaced = sorted(name for name in modules if layer_of(name) is None)
    daemon = {name.split(".", 1)[1] if "." in name else "__init__" for name in modules if name.startswith("sidecar")}
    stale = sorted(
        entry for _, names in LAYERS for entry in names
        if entry not in daemon and not any(name.startswith(f"{entry}.") for name in daemon)
    )
    if unplaced:
        pytest.fail(f"modules with no layer in LAYERS (decide where each belongs): {unplaced}", pytrace=False)
    if stale:
        pytest.fail(f"LAYERS names modules that do not exist: {stale}", pytrace=False)


def test_imports_only_point_down() -> None:
    upward = []
    for edge in import_edges():
        source, target = layer_of(edge.source), layer_of(edge.target)
        if source is None or target is None:
            continue  # not in the table: the test above names it
        if target < source:
            upward.append(f"{edge}  [{layer_name(source)} imports {layer_name(target)}]")
    if upward:
        pytest.fail("imports from a lower layer to a higher one:\n" + "\n".join(upward), pytrace=False)


def test_no_import_cycles() -> None:
    edges = import_edges()
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in edges:
        graph[edge.source].add(edge.target)
    cycles = [
        "\n".join(["cycle among " + ", ".join(sorted(component)) + ":"]
                  + [f"  {edge}" for edge in edges if edge.source in component and edge.target in component])
        for component in strongly_connected(graph)
        if len(component) > 1
    ]
    if cycles:
        pytest.fail("import cycles:\n" + "\n".join(cycles), pytrace=False)


def test_modules_are_at_most_400_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {count} lines"
        for path in module_files().values()
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    ]
    if long:
        heading = f"modules over {MAX_LINES} lines (one concept per module; split it):"
        pytest.fail("\n".join([heading, *long]), pytrace=False)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (a deep import chain must not hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in list(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components
