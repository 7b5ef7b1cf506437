"""vdep's import graph has no cycle: not between modules (imports inside functions count: a lazy import
only hides a cycle until the day someone moves it up), and not between packages, so that each layer of
docs/design.md ("The package graph has no cycle") can be read, tested and changed below the ones above it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder → the import name it is installed under (pyproject.toml's package-dir).
SOURCES = {ROOT / "vdep": "vdep", ROOT / "data_tools": "vdep.data_tools"}


def module_files() -> dict[str, Path]:
    modules = {}
    for folder, name in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The vdep modules `module` imports anywhere in its file (`from .x import name` counts as x, or as
    x.name when that is a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in candidates if name in known and name != module)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    known = module_files()
    return {module: imported_modules(module, path, known) for module, path in known.items()}


def package_of(module: str) -> str:
    """`vdep.train.setup` → `vdep.train`; a module at the top of vdep (vdep.rundir) is its own node."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert "vdep.rundir" in graph and "vdep.data_tools.build_shards" in graph  # the walk sees both source folders
    assert "vdep.train.launch" in graph["vdep.demo"]  # and imports inside functions
    assert cycles(graph) == []


def test_no_package_imports_itself_through_others():
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        own = package_of(module)
        packages.setdefault(own, set()).update(package_of(t) for t in targets if package_of(t) != own)
    assert cycles(packages) == []


def test_the_run_directory_imports_nothing_of_training_export_or_evaluation():
    """The resolver sits below everything that asks it which weights make a model (docs/design.md)."""
    graph = import_graph()
    reached, todo = set(), ["vdep.rundir"]
    while todo:
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    assert "vdep.weight_layers" in reached
    assert not {m for m in reached if package_of(m) in ("vdep.train", "vdep.export", "vdep.eval", "vdep.evaluate")}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
