"""No umxtools module imports itself back through others, at module level or inside a function.

An import cycle makes the order of imports matter and hides which module is built on which (issue
15: ``models/loading.py`` and ``pretrained.py`` imported each other inside functions). The imports
are read from the source with ``ast``, function-level ones included, and searched for cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "umxtools"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(path: Path, mods: dict[str, Path], module_level: bool) -> set[str]:
    """The umxtools modules ``path`` imports (``from umxtools.x import y`` counts ``umxtools.x.y``
    when that is a module, and ``umxtools.x`` either way)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in mods:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods}
    return found


def _cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every elementary cycle, each rotated to start at its smallest module name."""
    cycles = set()

    def walk(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module]):
            if dep in path:
                cycle = path[path.index(dep):]
                start = cycle.index(min(cycle))
                cycles.add(tuple(cycle[start:] + cycle[:start]))
            elif dep > path[0]:  # each cycle is found from its smallest member only
                walk(dep, [*path, dep])

    for module in sorted(graph):
        walk(module, [module])
    return cycles


def test_the_walk_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}
    assert _cycles({"a": {"b"}, "b": set()}) == set()


@pytest.mark.parametrize("module_level", [True, False], ids=["module-level", "any"])
def test_no_import_cycle(module_level):
    mods = _modules()
    graph = {name: _imports(path, mods, module_level) - {name} for name, path in mods.items()}
    assert "umxtools.pretrained" in graph["umxtools.models.loading"]  # the walk sees the imports it must see
    assert _cycles(graph) == set()
