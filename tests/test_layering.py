"""The package's import layering, read statically (ast) from every module under flashinfer/:

- no import cycle anywhere in flashinfer/ (function-local imports count: they only hide a cycle);
- the JIT engine (flashinfer/jit/) imports nothing of the API layer (flashinfer/*.py and subpackages outside
  jit/), except the leaf flashinfer/_version.py, which imports nothing of the package.

An import of a package's submodule (``from . import cache``) is an edge to that submodule; the implicit
import of parent packages (``flashinfer/__init__.py`` runs before any submodule) is not counted, as Python
tolerates it and every module would otherwise depend on the top-level package.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINE = "flashinfer.jit"
ENGINE_MAY_IMPORT = {"flashinfer._version"}  # leaf modules of the API package the engine may read


def module_files(root: Path, package: str) -> Dict[str, Path]:
    """{dotted module name: file} of every module under ``root`` (the directory of ``package``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = [package, *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(name: str, path: Path, modules: Set[str], package: str) -> Set[str]:
    """The modules of ``modules`` that module ``name`` (file ``path``) imports."""
    is_pkg = path.name == "__init__.py"
    pkg_parts = name.split(".") if is_pkg else name.split(".")[:-1]
    found: Set[str] = set()

    def add(target: str) -> None:
        # The deepest known module of a dotted target (``a.b.c`` where c is an attribute -> ``a.b``).
        parts = target.split(".")
        while parts:
            cand = ".".join(parts)
            if cand in modules:
                found.add(cand)
                return
            parts.pop()

    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                base = ".".join(base_parts + (node.module.split(".") if node.module else []))
            else:
                base = node.module or ""
            if not (base == package or base.startswith(package + ".")):
                continue
            attrs = [a.name for a in node.names if f"{base}.{a.name}" not in modules]
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    found.add(f"{base}.{a.name}")
            if attrs:  # names read from the module itself (not only its submodules)
                add(base)
    found.discard(name)
    return found


def import_graph(root: Path, package: str) -> Dict[str, Set[str]]:
    files = module_files(root, package)
    return {name: imports_of(name, path, set(files), package) for name, path in files.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as [a, b, ..., a], or None."""
    state: Dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: List[str] = []

    def visit(n: str) -> Optional[List[str]]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                cyc = visit(m)
                if cyc:
                    return cyc
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cyc = visit(n)
            if cyc:
                return cyc
    return None


def engine_violations(graph: Dict[str, Set[str]]) -> List[str]:
    """``"a imports b"`` for every engine module importing the API layer (other than the allowed leaves)."""
    return sorted(
        f"{name} imports {dep}"
        for name, deps in graph.items()
        if name == ENGINE or name.startswith(ENGINE + ".")
        for dep in deps
        if not (dep == ENGINE or dep.startswith(ENGINE + ".")) and dep not in ENGINE_MAY_IMPORT
    )


@pytest.fixture(scope="module")
def graph() -> Dict[str, Set[str]]:
    return import_graph(REPO / "flashinfer", "flashinfer")


def test_the_graph_is_read(graph):
    # Known edges: if parsing silently found nothing, the other tests would pass vacuously.
    assert "flashinfer.jit.cache" in graph["flashinfer.jit.loader"]
    assert "flashinfer.jit.locks" in graph["flashinfer.jit.loader"]
    assert "flashinfer.jit.spec" in graph["flashinfer._families"]
    assert "flashinfer.jit" in graph["flashinfer.cli.prewarm"]
    assert "flashinfer._version" in graph["flashinfer.jit.env"]


def test_no_import_cycle_in_the_package(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_engine_does_not_import_the_api_layer(graph):
    assert engine_violations(graph) == []


def test_the_version_module_is_a_leaf(graph):
    for leaf in ENGINE_MAY_IMPORT:
        assert graph[leaf] == set(), f"{leaf} must import nothing of the package (the engine reads it)"


def test_the_checker_finds_planted_cycles_and_violations(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "jit").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import api\n")
    (pkg / "api.py").write_text("from .jit import core\n")
    (pkg / "jit" / "__init__.py").write_text("")
    (pkg / "jit" / "core.py").write_text("from . import build\n")
    (pkg / "jit" / "build.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import api\n"
        "def f():\n    from .core import g  # a local import still counts\n"
    )
    g = import_graph(pkg, "pkg")
    assert g["pkg.jit.core"] == {"pkg.jit.build"} and g["pkg.jit.build"] == {"pkg.jit.core"}
    cycle = find_cycle(g)
    assert cycle is not None and cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["pkg.jit.build", "pkg.jit.core"]
    (pkg / "jit" / "build.py").write_text("import pkg.api\n")  # the engine reaching up into the API layer
    g = import_graph(pkg, "pkg")
    assert find_cycle(g) == ["pkg.api", "pkg.jit.core", "pkg.jit.build", "pkg.api"]
    (pkg / "api.py").write_text("")
    g = import_graph(pkg, "pkg")
    assert find_cycle(g) is None
    global ENGINE
    old, ENGINE = ENGINE, "pkg.jit"
    try:
        assert engine_violations(g) == ["pkg.jit.build imports pkg.api"]
    finally:
        ENGINE = old
