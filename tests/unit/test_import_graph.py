"""The package's import graph, read from the source with ast: no cycle, and a stdlib-only launcher.

Every import counts: at module level, inside functions (late imports) and under
``if TYPE_CHECKING:`` -- a late import hides a cycle from the interpreter, not from the design.
import-linter (``lint-imports``, contracts in pyproject.toml) checks the layers; this test checks
what its contracts cannot say: no cycle among *any* of the package's modules (siblings inside
one layer included), and that what the launcher reaches outside the package is the stdlib only.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "pytest_sandbox"

# The deliberate exceptions, each an edge (importer, imported) with why.  Keep this list short:
# an entry whose import is gone fails the test, so that it is removed too; and such an edge is
# never imported when its module is (only inside functions, or for type checkers).
ALLOWED_EDGES = {
    ("pytest_sandbox.container", "pytest_sandbox.image"): (
        "Container.commit returns an Image, and the image facade builds on containers (image.run); "
        "one late import in commit(), the same edge for its return type under TYPE_CHECKING"
    ),
}

# What the launcher (the fork server that runs as root) may import of the package.
LAUNCHER_MAY_REACH = ("pytest_sandbox.core", "pytest_sandbox.host", "pytest_sandbox.launcher")


def _package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # found, not imported: this tier starts nothing
    assert spec is not None
    assert spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def _modules() -> dict[str, Path]:
    root = _package_dir()
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(tree: ast.AST, *, deferred: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, and whether it is deferred: in a function, or under TYPE_CHECKING."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, deferred
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.body:  # never runs; its else: does
                yield from _imports(ast.Module([statement], []), deferred=True)
            for statement in node.orelse:
                yield from _imports(ast.Module([statement], []), deferred=deferred)
        else:
            functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            yield from _imports(node, deferred=deferred or isinstance(node, functions))


def _imported_names(module: str, path: Path) -> Iterator[tuple[str, bool]]:
    """Each absolute name ``module`` imports (``a.b``, or ``a.b.c`` for ``from a.b import c``), and
    whether that import is deferred."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node, deferred in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, deferred
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        for alias in node.names:  # a submodule, or a name defined in ``source``
            yield f"{source}.{alias.name}", deferred


class _Graph:
    """The package's imports: ``internal`` module -> modules, ``eager`` the internal edges made
    when the module is imported, ``external`` the outside top-level packages each module imports."""

    def __init__(self) -> None:
        modules = _modules()
        self.internal: dict[str, set[str]] = {m: set() for m in modules}
        self.eager: set[tuple[str, str]] = set()
        self.external: dict[str, set[str]] = {m: set() for m in modules}
        for module, path in modules.items():
            for name, deferred in _imported_names(module, path):
                if name.split(".")[0] != PACKAGE:
                    self.external[module].add(name.split(".")[0])
                    continue
                target = name
                while target not in modules:  # `from pkg import function`: the edge is to pkg
                    target = target.rpartition(".")[0]
                if target != module:
                    self.internal[module].add(target)
                    if not deferred:
                        self.eager.add((module, target))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_counting_late_and_type_checking_imports() -> None:
    graph = _Graph()
    internal = graph.internal
    for importer, imported in ALLOWED_EDGES:
        assert imported in internal[importer], f"{importer} -> {imported} is gone: drop its entry here"
        assert (importer, imported) not in graph.eager, f"{importer} imports {imported} at import time"
        internal[importer].discard(imported)
    cycles = _cycles(internal)
    described = [
        "\n".join(f"  {a} -> {b}" for a in cycle for b in sorted(internal[a]) if b in cycle)
        for cycle in cycles
    ]
    assert not cycles, "import cycle(s):\n" + "\n\n".join(described)


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_the_launcher_reaches_only_core_host_and_the_stdlib() -> None:
    graph = _Graph()
    internal, external = graph.internal, graph.external
    seen: set[str] = set()
    todo = [m for m in internal if m.startswith("pytest_sandbox.launcher")]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        assert module == PACKAGE or module.startswith(LAUNCHER_MAY_REACH), f"the launcher reaches {module}"
        outside = external[module] - set(sys.stdlib_module_names) - {"__future__"}
        assert not outside, f"{module} (reached by the launcher) imports {sorted(outside)}: stdlib only"
        todo.extend(internal[module])
