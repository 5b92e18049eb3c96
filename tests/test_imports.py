"""No import cycle inside the package: each module is one noun of the design, and a module
that needs another one's reverse is a sign the two are tangled (a cycle hidden in a function's
body, as the chunk job's once was, is a cycle all the same)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

PACKAGE = "zero_one_instruction"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", "")
    return name == "TYPE_CHECKING"


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import that can run, wherever it stands (a function's body too); not those
    under `if TYPE_CHECKING:`, which never run."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        children = node.orelse if isinstance(node, ast.If) and _type_checking(node) else None
        pending.extend(children if children is not None else ast.iter_child_nodes(node))
    return found


def _targets(
    node: ast.Import | ast.ImportFrom, name: str, is_package: bool, modules: set[str]
) -> set[str]:
    """The package's modules an import statement of module `name` runs: `from a import b`
    runs a.b if that is a module, else a."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & modules
    package = name if is_package else name.rpartition(".")[0]
    base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
    found = {f"{base}.{alias.name}" for alias in node.names} & modules
    if len(found) < len(node.names):
        found.add(base)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _import_nodes(tree):
            edges |= _targets(node, name, is_package, set(modules))
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it began, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for target in sorted(graph.get(node, ())):
            cycle = visit(target, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_the_package() -> None:
    graph = import_graph()
    assert f"{PACKAGE}.machine" in graph[f"{PACKAGE}.cli"], "the graph reads lazy imports too"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_command_line_loads_no_heavy_library_until_a_command_needs_it() -> None:
    """`zoi --help` and the quick commands start in well under a second: the queue (RQ), the
    report's libraries and the engine are imported by the commands that use them."""
    heavy = ("rq", "datasketch", "matplotlib", "jinja2", "vllm", "torch", "transformers")
    probe = f"import sys, {PACKAGE}.cli; print(*sorted(m for m in {heavy!r} if m in sys.modules))"
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT.parent
    )
    assert found.stdout.split() == []
