"""The project's own modules (distillery, flows, tasks, schemas) import each other without a
cycle, and no module (those or tests/) imports a private name (``_x``) of another.

Every import counts, the ones inside functions too (they break no cycle, they only hide it from
import time). Read from the source with ``ast``, so nothing is imported here.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distillery", "flows", "tasks", "schemas")
TESTS = "tests"  # their helpers are shared by name too: checked for private imports, not cycles


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(packages=PACKAGES) -> dict[str, Path]:
    return {_module_name(p): p for package in packages for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """``(line, imported module, names taken from it)`` for each import of a project module."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in modules:
                continue
            names = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:  # `from package import module`
                    yield node.lineno, submodule, []
                else:
                    names.append(alias.name)
            if names:
                yield node.lineno, source, names


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """The import graph of the project's packages, and the private names imported anywhere."""
    modules = _modules((*PACKAGES, TESTS))
    graph: dict[str, set[str]] = {name: set() for name in modules if name.split(".")[0] != TESTS}
    private = []
    for name, path in modules.items():
        for line, source, names in _imports(name, path, modules):
            if source != name and name in graph and source in graph:
                graph[name].add(source)
            for imported in names:
                if imported.startswith("_") and not imported.endswith("__"):
                    private.append(f"{path.relative_to(ROOT)}:{line}: from {source} import {imported}")
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path back to its start) per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles = []
    for group in groups:
        start = min(group)
        path, seen = [start], {start}
        while True:  # walk inside the group until a module repeats
            nxt = min(m for m in graph[path[-1]] if m in group)
            if nxt in seen:
                cycles.append(path[path.index(nxt) :] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def test_the_graph_sees_the_project():
    graph, _ = _graph()
    assert {"distillery.cli", "distillery.store", "tasks.score", "schemas.recipe"} <= set(graph)
    assert "distillery.store" in graph["distillery.cli"]  # a function-level import counts
    assert not any(name.startswith("tests") for name in graph)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle_between_project_modules():
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_no_private_name_is_imported_from_another_module():
    _, private = _graph()
    assert private == []
