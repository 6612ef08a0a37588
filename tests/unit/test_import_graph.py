"""The package's import graph has no cycles, type-only imports included.

A cycle closed by a lazy or ``TYPE_CHECKING`` import still means two
modules cannot be understood (or tested) without each other, and is the
first sign of a service locator: a module below the facade reaching back
up for its collaborators instead of being handed them. Every ``import``
statement counts, wherever it sits in the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import ares_celery

PACKAGE = Path(ares_celery.__file__).parent
ROOT = PACKAGE.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(current: str, is_package: bool, level: int,
             module: str | None) -> str:
    if level == 0:
        return module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> nx.DiGraph:
    """Module -> every ares_celery module it imports (a ``from pkg import
    name`` counts as importing the submodule ``pkg.name`` if there is one,
    else ``pkg`` itself)."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target in modules and target != name:
                    graph.add_edge(name, target)
    return graph


def test_the_walk_sees_the_package():
    graph = import_graph()
    assert "ares_celery.app" in graph
    # A known edge, so a broken walk cannot pass by finding nothing.
    assert graph.has_edge("ares_celery.app", "ares_celery.settings")


def test_no_import_cycles():
    cycles = sorted(" -> ".join(c + [c[0]])
                    for c in nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(cycles[:20])


def test_nothing_below_the_facade_imports_it():
    """Collaborators are passed in: only the package root re-exports
    ``Ares`` (the CLI plugin reaches it through the app it is given)."""
    allowed = {"ares_celery", "ares_celery.app"}
    importers = {src for src, dst in import_graph().edges
                 if dst == "ares_celery.app"}
    assert importers <= allowed, sorted(importers - allowed)
