"""The package's layers, read from the source with `ast` (every import: top level, inside functions, under
TYPE_CHECKING): core/ imports nothing outside core/, and no module imports itself through others."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "adaspec"
CORE = "adaspec.core"


def modules(root: Path = SRC / PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, source: str, known: set[str]) -> dict[str, int]:
    """The package's modules that module `name` (its source) imports -> the line of the first such import.
    `from a.b import c` is an import of a.b.c where that is a module, else of a.b; a relative import is resolved
    against the module's package."""
    package = name if name in known and any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # the innermost module of the package it names
                target = target.rpartition(".")[0]
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    files = modules()
    return {name: imports_of(name, path.read_text(), set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle [a, b, ..., a] of `graph` (module -> imported modules), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)) + f" -> {cycle[-1]}"


def test_core_imports_nothing_above_it():
    graph = import_graph()
    assert any(name.startswith(CORE + ".") for name in graph), "no core package found"
    wrong = [f"{name}:{line} imports {target}" for name, targets in sorted(graph.items())
             if name == CORE or name.startswith(CORE + ".")
             for target, line in sorted(targets.items()) if not (target == CORE or target.startswith(CORE + "."))]
    assert not wrong, "core/ must import only core/ (move the code down, or the caller up):\n" + "\n".join(wrong)


def test_no_import_circles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + describe(cycle, graph)


def test_the_checks_see_function_level_imports_and_circles():
    known = {"p", "p.a", "p.b", "p.sub", "p.sub.c"}
    source = "import os\nfrom p import b\n\ndef f():\n    from .sub import c\n    import p.sub.c as d\n"
    assert imports_of("p.a", source, known) == {"p.b": 2, "p.sub.c": 5}
    graph = {"p.a": {"p.b": 1}, "p.b": {"p.sub.c": 3}, "p.sub.c": {"p.a": 7}, "p.x": {}}
    cycle = find_cycle(graph)
    assert cycle == ["p.a", "p.b", "p.sub.c", "p.a"]
    assert describe(cycle, graph) == "p.a (line 1) -> p.b (line 3) -> p.sub.c (line 7) -> p.a"
    assert find_cycle({"p.a": {"p.b": 1}, "p.b": {}}) is None
