"""The packages are layered: no import cycle among their modules, no module over 800 lines.

The import graph is read from the source (``ast``), not from a running interpreter:
every ``import`` and ``from ... import`` counts, at module level, inside functions
and under ``if TYPE_CHECKING:`` alike, because each is a dependency a reader has
to follow.  ``from package import name`` is an edge to the module ``package.name``
when that module exists, else to ``package`` itself.  (Importing ``a.b`` also runs
``a/__init__.py``; those implicit parent edges are left out, as import linters do:
they would put every package on a cycle with its own re-exports.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 800


def modules(package: str) -> dict[str, Path]:
    """Every module of ``package`` (a directory under the repository root), by dotted name."""
    base = ROOT / package
    out = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, mod: str, is_package: bool, level: int) -> str:
    if level == 0:
        return name
    base = mod.split(".") if is_package else mod.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph(package: str) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}`` for every module of ``package``."""
    mods = modules(package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", mod, is_package, node.level)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:  # a name inside a module: the module
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None if the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_function_level_and_type_checking_imports() -> None:
    graph = import_graph("rdmaio")
    assert "rdmaio._region" in graph["rdmaio.transports.base"]  # under TYPE_CHECKING
    assert "rdmaio._native._rdmaio_native" not in graph  # compiled: not a source module
    assert graph["rdmaio"] >= {"rdmaio._engine", "rdmaio._endpoint", "rdmaio.transports"}


@pytest.mark.parametrize("package", ["rdmaio"])
def test_no_import_cycle(package: str) -> None:
    cycle = find_cycle(import_graph(package))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", ["rdmaio"])
def test_no_module_is_over_800_lines(package: str) -> None:
    long = {m: n for m, p in modules(package).items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
