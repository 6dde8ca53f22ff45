"""Architecture checks: no import cycle, and the layers of a package import only downward.

The import graph is read statically from the AST of every module: every
``import`` and ``from ... import`` statement counts, also inside functions and
under ``if TYPE_CHECKING:``, so a lazy import cannot hide an edge.  The
implicit import of a module's parent packages is not an edge.

flexemr's layers (``flexemr/__init__.py`` and ``docs/architecture.md``)::

    _native   the C kernel (cffi)         nothing
    core      pure numpy, no I/O          _native
    client    the ranker                  core (and rdmaio's public names)
    server    the embedding server        core (and rdmaio's public names)
    testing   test oracles                core
    torch     TorchRec modules (extra)    core, client
    apps      cli, LocalCluster, demo...  core, client, server, torch
    bench     benchmarks                  core, client, server, apps, torch
    ray       on Ray (extra): actors,     core, client, server, apps
              Serve rankers, its CLI
    __main__  the ``flexemr`` command     apps, bench, ray
    flexemr   the package (re-exports)    core, client, server, apps; imported by nobody
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

Graph = dict[str, set[str]]


def _modules(package: str, root: Path = ROOT) -> dict[str, Path]:
    """Every module of ``package`` under ``root``: dotted name -> file."""
    out: dict[str, Path] = {}
    for path in sorted((root / package.replace(".", "/")).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path) -> list[str]:
    """The absolute names every import statement of ``module`` names (``from a import b`` -> ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names += [f"{prefix}.{alias.name}" for alias in node.names]
    return names


def _graph(package: str, root: Path = ROOT) -> Graph:
    """Module -> the modules of ``package`` it imports (each name resolved to the longest module it is in)."""
    mods = _modules(package, root)
    graph: Graph = {m: set() for m in mods}
    for mod, path in mods.items():
        for name in _imports(mod, path):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != mod:
                graph[mod].add(name)
    return graph


def _cycle(graph: Graph) -> list[str] | None:
    """One import cycle of ``graph`` (``[a, b, ..., a]``), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _layer_of(module: str, layers: Mapping[str, object]) -> str:
    """The layer (the longest layer name that is ``module`` or a package holding it)."""
    best = ""
    for layer in layers:
        if (module == layer or module.startswith(layer + ".")) and len(layer) > len(best):
            best = layer
    assert best, f"{module} is in no layer: add it to the layer table"
    return best


def _layer_violations(graph: Graph, layers: Mapping[str, set[str]]) -> list[str]:
    """Every import of a module from a layer its own layer may not use."""
    out = []
    for mod, targets in sorted(graph.items()):
        src = _layer_of(mod, layers)
        for t in sorted(targets):
            dst = _layer_of(t, layers)
            if dst != src and dst not in layers[src]:
                out.append(f"{mod} ({src}) imports {t} ({dst}); {src} may import only {sorted(layers[src])}")
    return out


# --------------------------------------------------------------------------- flexemr

FLEXEMR_LAYERS: dict[str, set[str]] = {
    "flexemr._native": set(),  # the C kernel (cffi); its build script only
    "flexemr.core": {"flexemr._native"},
    "flexemr.client": {"flexemr.core"},
    "flexemr.server": {"flexemr.core"},
    "flexemr.testing": {"flexemr.core"},
    "flexemr.torch": {"flexemr.core", "flexemr.client"},
    "flexemr.apps": {"flexemr.core", "flexemr.client", "flexemr.server", "flexemr.torch"},
    "flexemr.bench": {"flexemr.core", "flexemr.client", "flexemr.server", "flexemr.apps", "flexemr.torch",
                      "flexemr._native"},  # the kernel bench counts instructions inside the native calls
    # flexemr.ray runs the apps' servers and rankers on Ray: at the level of bench, above apps
    "flexemr.ray": {"flexemr.core", "flexemr.client", "flexemr.server", "flexemr.apps"},
    "flexemr.__main__": {"flexemr.apps", "flexemr.bench", "flexemr.ray"},
    "flexemr": {"flexemr.core", "flexemr.client", "flexemr.server", "flexemr.apps"},
}


def test_flexemr_import_graph_has_no_cycle() -> None:
    graph = _graph("flexemr")
    assert "flexemr.client.client" in graph["flexemr"] and "flexemr.core.errors" in graph["flexemr.core.plan"]
    assert "flexemr.apps.demo" in graph["flexemr.apps.cli"]  # an import inside a function counts
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_flexemr_layers() -> None:
    assert _layer_violations(_graph("flexemr"), FLEXEMR_LAYERS) == []


def test_flexemr_uses_only_rdmaio_public_names() -> None:
    bad = [f"{mod}: {name}" for mod, path in _modules("flexemr").items() for name in _imports(mod, path)
           if name.startswith("rdmaio.") and any(p.startswith("_") for p in name.split(".")[1:])]
    assert bad == []


def test_flexemr_module_sizes() -> None:
    """No module over 800 lines; the module of EmbeddingClient (a facade) under 400."""
    lines = {mod: len(path.read_text().splitlines()) for mod, path in _modules("flexemr").items()}
    assert {m: n for m, n in lines.items() if n > 800} == {}
    assert lines["flexemr.client.client"] < 400


def test_the_checks_see_cycles_lazy_imports_and_upward_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    for init in (pkg, pkg / "low", pkg / "high"):
        (init / "__init__.py").write_text('"""x"""\n')
    (pkg / "low" / "a.py").write_text("def f():\n    from ..high import b\n")
    (pkg / "high" / "b.py").write_text("from pkg.low.a import f\nimport pkg.low\n")
    graph = _graph("pkg", tmp_path)
    assert graph["pkg.low.a"] == {"pkg.high.b"} and graph["pkg.high.b"] == {"pkg.low.a", "pkg.low"}
    assert _cycle(graph) == ["pkg.high.b", "pkg.low.a", "pkg.high.b"]
    layers = {"pkg.low": set(), "pkg.high": {"pkg.low"}, "pkg": set()}
    assert _layer_violations(graph, layers) == [
        "pkg.low.a (pkg.low) imports pkg.high.b (pkg.high); pkg.low may import only []"]
    with pytest.raises(AssertionError, match="in no layer"):
        _layer_of("other.x", layers)


# --------------------------------------------------------------------------- rdmaio

#: rdmaio's layers (``docs/architecture.md``): the public front (engine, endpoint, listener)
#: sits on the core, the control plane and the transports; transports see only the memory
#: layer and the wire/progress plumbing below them, never the front.
RDMAIO_FRONT = {"rdmaio._engine", "rdmaio._endpoint", "rdmaio._listener", "rdmaio"}


def test_rdmaio_import_graph_has_no_cycle() -> None:
    graph = _graph("rdmaio")
    assert "rdmaio._region" in graph["rdmaio.transports.base"]  # under TYPE_CHECKING: still an edge
    assert "rdmaio._native._rdmaio_native" not in graph  # compiled: not a source module
    assert graph["rdmaio"] >= {"rdmaio._engine", "rdmaio._endpoint", "rdmaio.transports"}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_rdmaio_transports_never_reach_back_into_the_front() -> None:
    graph = _graph("rdmaio")
    bad = {m: sorted(graph[m] & RDMAIO_FRONT) for m in graph if m.startswith("rdmaio.transports")
           and graph[m] & RDMAIO_FRONT}
    assert bad == {}


def test_rdmaio_module_sizes() -> None:
    lines = {mod: len(path.read_text().splitlines()) for mod, path in _modules("rdmaio").items()}
    assert {m: n for m, n in lines.items() if n > 800} == {}


# --------------------------------------------------------------------------- optional libraries

#: The apps extra's libraries (figures, progress bars, Criteo/Parquet files): imported where used, never on import.
APPS_LIBRARIES = ("matplotlib", "tqdm", "pyarrow")


def test_importing_the_packages_imports_no_optional_library() -> None:
    """``import rdmaio`` loads none of the apps extra's libraries nor flexemr's TOML writer; ``import flexemr``
    (and the ``flexemr`` command's module, which builds every command) none of the apps extra's."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import rdmaio\n"
            "rd = sorted(m for m in sys.modules if m.split('.')[0] in {libs!r} + ('tomli_w',))\n"
            "import flexemr, flexemr.__main__, flexemr.apps.demo, flexemr.apps.rank, flexemr.bench.__main__\n"
            "fx = sorted(m for m in sys.modules if m.split('.')[0] in {libs!r})\n"
            "assert not rd and not fx, (rd, fx)\n"
            "assert 'flexemr.apps.criteo' in sys.modules and 'tomli_w' in sys.modules\n").format(libs=APPS_LIBRARIES)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
