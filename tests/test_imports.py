"""The import graph of ``osd``, read from the source with ``ast``: no cycles, no upward imports.

Every import counts, those inside functions too (a deferred import that closes a cycle is
still a cycle). "Upward": a module importing the package that contains it (its
``__init__`` imports the whole package), or a module of the optimizer library importing the
training harness above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "osd"
# The training harness: what the optimizer library (everything osd.optimizer imports) must not import.
HARNESS = ("osd.train", "osd.config", "osd.data", "osd.models", "osd.cli", "osd.hf", "osd.checkpoint", "osd.runs", "osd.bench")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports (``from p import m`` counts as ``p.m``
    when ``m`` is a module, else as ``p``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    return {target for target in found if target in modules and target != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def test_the_checks_find_what_they_look_for() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = _graph()
    assert "osd.optimizer" in graph["osd.presets"] and "osd.functional" in graph["osd.rules"]
    assert {"osd.train", "osd.bench"} <= _closure(graph, "osd.cli")


def test_no_import_cycles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_module_imports_its_own_package() -> None:
    graph = _graph()
    upward = [(module, target) for module, targets in graph.items() for target in targets if module.startswith(target + ".")]
    assert not upward, upward


@pytest.mark.parametrize("library", ["osd.optimizer", "osd.layerwise", "osd.presets", "osd.memory"])
def test_the_optimizer_library_does_not_import_the_harness(library: str) -> None:
    above = sorted(m for m in _closure(_graph(), library) if m.startswith(HARNESS))
    assert not above, f"{library} imports the training harness: {above}"


def test_the_maths_imports_nothing_of_the_package() -> None:
    assert _graph()["osd.functional"] == set()
