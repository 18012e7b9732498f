"""The package's modules import each other without a cycle.

A cycle works only while every module of it imports the others inside functions, or late enough in its body: one
import moved to the top breaks the package at import time, in whichever order a user happens to import it. So the
graph counts every relative import (and every absolute one of the package), at module level and inside functions.
"""
import ast
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import dissect_unlearning

PACKAGE = dissect_unlearning.__name__

# Cycles that a change in progress elsewhere is to remove, by their modules, with what removes them. The test fails on
# any other cycle, is an expected failure while these remain, and passes once they are gone: then delete them here.
PENDING: dict[frozenset, str] = {}


def modules() -> dict[str, Path]:
    """Every module of the package (packages by their __init__.py), by dotted name."""
    found = {PACKAGE: Path(dissect_unlearning.__file__)}
    for info in pkgutil.walk_packages(dissect_unlearning.__path__, prefix=PACKAGE + "."):
        spec = importlib.util.find_spec(info.name)
        found[info.name] = Path(spec.origin)
    return found


def _targets(name: str, is_package: bool, node, known) -> set[str]:
    """The package's modules that an import statement of module `name` runs."""
    if isinstance(node, ast.Import):
        wanted = [a.name for a in node.names]
    elif node.level == 0:
        wanted = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
        # `from . import x` and `from .a import x`: x is a submodule or a name defined in the package or module
        wanted = [module] + [f"{module}.{a.name}" for a in node.names]
    out = set()
    for target in wanted:
        if target not in known:
            continue
        # Importing a.b.c runs a/__init__ and a/b/__init__ first; the packages that hold the importer itself are
        # already being imported when it runs, so an edge to them is no cycle.
        parts = target.split(".")
        out |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {t for t in out if not (name == t or name.startswith(t + "."))}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set()
        # `if TYPE_CHECKING:` blocks never run: their imports are for annotations only
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):  # module level, inside functions and classes alike
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only:
                graph[name] |= _targets(name, is_package, node, known)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph, component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, as [a, b, ..., a]."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_the_graph_sees_relative_absolute_and_nested_imports():
    known = modules()

    def targets(module, statement, is_package=False):
        return {t.removeprefix(PACKAGE + ".") for t in _targets(f"{PACKAGE}.{module}", is_package,
                                                               ast.parse(statement).body[0], known)}

    assert targets("book.builder", "from .. import cache, precompute") == {"cache", "precompute"}
    assert targets("book.profiles", "from .params import check_value") == {"book.params"}
    # a submodule runs its packages' __init__ first; the importer's own packages are already running
    assert targets("book.params", "from ..unlearning.relearn import KINDS") == {"unlearning", "unlearning.relearn"}
    assert targets("book", "from .chapter import chapters", is_package=True) == {"book.chapter"}
    assert targets("cli", "import dissect_unlearning.patching.experiments") == {"patching", "patching.experiments"}
    assert targets("cli", "import json") == set()
    graph = import_graph()
    assert graph[f"{PACKAGE}.validate"] == set()
    assert f"{PACKAGE}.book" in graph[f"{PACKAGE}.cli"]  # imported inside the command functions
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    shown = "\n  ".join(" -> ".join(c) for c in found)
    assert all(frozenset(c) in PENDING for c in found), f"import cycle(s) among the package's modules:\n  {shown}"
    if found:
        pytest.xfail("import cycles that changes in progress are to remove:\n  " + "\n  ".join(
            f"{' -> '.join(c)} ({PENDING[frozenset(c)]})" for c in found))
