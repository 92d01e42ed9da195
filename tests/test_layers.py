"""The package's layers point one way: no import cycle inside kdcache/, and the format imports nothing above it.

The graph is read from the modules' own import statements (every ``import`` and ``from ...
import``, at the top of a module or inside a function), so a deferred import that closes a
circle counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kdcache"
#: What the format package may import of kdcache's besides itself: the ground floor.
BELOW_FORMAT = {"kdcache.errors", "kdcache.location"}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The kdcache modules a file imports: ``from a.b import c`` is a.b.c when that is a module, else a.b."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # ``import kdcache.format.store as s`` and the like
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {name: imported_modules(path, name, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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


def test_no_module_inside_kdcache_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_the_format_package_imports_nothing_above_it():
    graph = import_graph()
    above = {name: sorted(t for t in targets if not t.startswith("kdcache.format") and t not in BELOW_FORMAT)
             for name, targets in graph.items() if name.startswith("kdcache.format")}
    assert {name: targets for name, targets in above.items() if targets} == {}


def test_the_ground_floor_imports_nothing_of_kdcache_but_itself():
    graph = import_graph()
    assert graph["kdcache.errors"] == set()
    assert graph["kdcache.location"] <= {"kdcache.errors"}


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "kdcache" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "kdcache"


@pytest.mark.parametrize(("files", "expected"), [
    # a deferred import inside a function closes the circle as much as a top-level one
    ({"__init__.py": "", "a.py": "from kdcache.b import f\n",
      "b.py": "def f():\n    from kdcache import a\n    return a\n"}, [["kdcache.a", "kdcache.b"]]),
    # relative imports, and a circle of three through a subpackage
    ({"__init__.py": "", "x.py": "from .sub.y import g\n", "sub/__init__.py": "",
      "sub/y.py": "from ..z import h\n", "z.py": "import kdcache.x\n"}, [["kdcache.sub.y", "kdcache.x", "kdcache.z"]]),
    # a package re-exporting its own modules is no circle, nor is a one-way chain
    ({"__init__.py": "", "p/__init__.py": "from kdcache.p.q import r\n", "p/q.py": "from kdcache.s import t\n",
      "s.py": "import os\n"}, []),
], ids=["deferred", "relative-three", "none"])
def test_the_cycle_check_finds_the_circles_it_is_made_to_find(tmp_path, files, expected):
    assert cycles(import_graph(write_package(tmp_path, files))) == expected
