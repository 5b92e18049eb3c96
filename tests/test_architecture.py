"""docs/architecture.md matches the code: its layer table names every module of the package
exactly once, its module list describes every one, and no module imports one of a higher
layer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .test_imports import PACKAGE, import_graph

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|$")
NAME = re.compile(r"`([^`]+)`")


def _dotted(name: str) -> str:
    """A name as the doc writes it (relative, `__init__` for the package) -> the module's."""
    return PACKAGE if name == "__init__" else f"{PACKAGE}.{name}"


def parse_layers(text: str) -> list[tuple[str, list[str]]]:
    """The layer table between `<!-- layers` and `<!-- /layers -->`, lowest layer first:
    (layer, its modules as dotted names). The rows must be numbered 1, 2, ... in order."""
    start = text.index("<!-- layers")
    block = text[start : text.index("<!-- /layers -->", start)]
    layers = []
    for line in block.splitlines():
        match = ROW.match(line.strip())
        if not match:
            continue
        number, layer, modules = match.groups()
        assert int(number) == len(layers) + 1, f"layer {layer!r} is numbered {number}"
        names = NAME.findall(modules)
        assert names, f"layer {layer!r} lists no module"
        layers.append((layer, [_dotted(name) for name in names]))
    assert layers, "docs/architecture.md has no layer table"
    return layers


def parse_described(text: str) -> list[str]:
    """The modules the `## Modules` section describes, one `- `name`: ...` line each."""
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    return [_dotted(name) for name in re.findall(r"^\s*- `([^`]+)`:", section, re.MULTILINE)]


def layer_of(layers: list[tuple[str, list[str]]]) -> dict[str, int]:
    """Every listed module -> its layer's number (1 is the lowest)."""
    return {module: i for i, (_, modules) in enumerate(layers, 1) for module in modules}


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, list[str]]]) -> list[str]:
    """Every import of a module of a higher layer, as `a (layer) -> b (layer)`."""
    rank = layer_of(layers)
    names = [layer for layer, _ in layers]
    return [
        f"{source} ({names[rank[source] - 1]}) -> {target} ({names[rank[target] - 1]})"
        for source in sorted(graph)
        for target in sorted(graph[source])
        if rank[target] > rank[source]
    ]


@pytest.fixture(scope="module")
def text() -> str:
    return DOC.read_text(encoding="utf-8")


def test_every_module_is_in_exactly_one_layer(text: str) -> None:
    listed = [module for _, modules in parse_layers(text) for module in modules]
    package = set(import_graph())
    problems = {
        "in more than one layer": sorted({module for module in listed if listed.count(module) > 1}),
        "not a module of the package": sorted(set(listed) - package),
        "in no layer": sorted(package - set(listed)),
    }
    found = {problem: modules for problem, modules in problems.items() if modules}
    assert not found, f"docs/architecture.md's layer table: {found}"


def test_every_module_is_described_once(text: str) -> None:
    described = parse_described(text)
    assert sorted(described) == sorted(set(described)), "a module is described twice"
    assert set(described) == set(import_graph()), (
        f"not described: {sorted(set(import_graph()) - set(described))}; "
        f"no such module: {sorted(set(described) - set(import_graph()))}"
    )


def test_no_module_imports_a_higher_layer(text: str) -> None:
    layers = parse_layers(text)
    graph = import_graph()
    assert set(layer_of(layers)) >= set(graph), "every module needs a layer first"
    upward = upward_imports(graph, layers)
    assert not upward, "imports of a higher layer:\n  " + "\n  ".join(upward)


def test_an_upward_import_is_named() -> None:
    layers = [("low", ["a"]), ("high", ["b"])]
    assert upward_imports({"a": set(), "b": {"a"}}, layers) == []
    assert upward_imports({"a": {"b"}, "b": set()}, layers) == ["a (low) -> b (high)"]
