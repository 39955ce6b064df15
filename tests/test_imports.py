"""The project's import graph: no circles, and imports point down the layers only.

Every module under trainer/, cluster/, launch/ and benchmarks/ is parsed (not imported), and every
import in it counts, at any depth: inside functions, under `if TYPE_CHECKING:`, relative ones
resolved. `from pkg import name` where `pkg.name` is a module counts as importing that module, else
as importing `pkg`. Importing `a.b.c` runs the packages `a` and `a.b` first, so it counts as
importing them too, except from inside them: a module's own packages are always imported before
its body runs, so a package whose `__init__` re-exports its submodules is no circle.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("trainer", "cluster", "launch", "benchmarks")
# Top-level names a layer must never import (DESIGN.md: launch -> cluster -> trainer).
FORBIDDEN = {
    "trainer": ("ray", "cluster", "launch"),
    "cluster": ("deepspeed", "launch"),
}


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    found = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imported_modules(module: str, path: Path, files: dict[str, Path]) -> list[tuple[str, int]]:
    """(dotted name, line) of what each import in the file names: the module imported, or for
    `from a import n` the module `a.n` when there is one, else `a` (a name defined in `a`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module, path).split(".")
                anchor = ".".join(package[: len(package) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule if submodule in files else base, node.lineno))
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def build_graph(root: Path, packages=PACKAGES) -> tuple[dict[str, dict[str, int]], dict[str, set[str]]]:
    """(edges: module -> {imported project module: first line}, external: module -> top-level
    names of everything it imports, the project's own included)."""
    files = module_files(root, packages)
    edges: dict[str, dict[str, int]] = {m: {} for m in files}
    external: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        own_packages = set(_parents(module)) | ({module} if path.name == "__init__.py" else set())
        for name, line in imported_modules(module, path, files):
            external[module].add(name.split(".")[0])
            implied = [p for p in _parents(name) if p not in own_packages]
            for target in [*implied, name]:
                if target in files and target != module:
                    edges[module].setdefault(target, line)
    return edges, external


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Circles, each as [m0, m1, ..., m0]: per strongly connected component (Tarjan, iterative), the
    shortest circle through each member that no circle named before passes through."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    found = []
    for component in sorted(components):
        covered: set[str] = set()
        for member in component:
            if member not in covered:
                found.append(_shortest_circle(edges, member, set(component)))
                covered.update(found[-1])
    return found


def _shortest_circle(edges: dict[str, dict[str, int]], first: str, inside: set[str]) -> list[str]:
    came_from: dict[str, str] = {}
    queue = deque([first])
    while queue:
        node = queue.popleft()
        for child in sorted(edges[node]):
            if child not in inside:
                continue
            if child == first:
                path = [node]
                while path[-1] != first:
                    path.append(came_from[path[-1]])
                return [first, *reversed(path[:-1]), first] if node != first else [first, first]
            if child not in came_from:
                came_from[child] = node
                queue.append(child)
    raise AssertionError(f"no circle through {first}")


def describe(edges: dict[str, dict[str, int]], circle: list[str]) -> str:
    steps = [f"{a} -> {b} (line {edges[a][b]})" for a, b in zip(circle[:-1], circle[1:], strict=True)]
    return " -> ".join(circle) + "\n    " + "\n    ".join(steps)


def layer_violations(external: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {name} ({layer}/ never imports {', '.join(FORBIDDEN[layer])})"
        for module, names in sorted(external.items())
        for layer in [module.split(".")[0]]
        for name in sorted(names)
        if name in FORBIDDEN.get(layer, ())
    ]


def test_no_import_circles():
    edges, _ = build_graph(ROOT)
    found = cycles(edges)
    assert not found, "import circles:\n" + "\n".join(describe(edges, c) for c in found)


def test_imports_point_down_the_layers():
    _, external = build_graph(ROOT)
    bad = layer_violations(external)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """A tree with a circle made only of imports a top-level scan would miss, a package whose
    `__init__` re-exports its submodules (no circle), and one whose submodule needs a name from
    that `__init__` (a circle)."""
    files = {
        "trainer/__init__.py": "",
        "trainer/a.py": "def f():\n    from trainer import b\n",
        "trainer/b.py": "from .sub.c import x\n",
        "trainer/sub/__init__.py": "",
        "trainer/sub/c.py": "import typing\nif typing.TYPE_CHECKING:\n    import trainer.a\nx = 1\n",
        "trainer/d.py": "import os\ndef g():\n    import ray.train\n",
        "trainer/ok/__init__.py": "from trainer.ok.one import y\n",
        "trainer/ok/one.py": "from trainer.ok.two import z\ny = z\n",
        "trainer/ok/two.py": "from trainer.ok import three\nz = 2\n",
        "trainer/ok/three.py": "",
        "trainer/bad/__init__.py": "from trainer.bad.one import y\nLIMIT = 3\n",
        "trainer/bad/one.py": "from trainer.bad import LIMIT\ny = LIMIT\n",
        "cluster/__init__.py": "",
        "cluster/e.py": "from trainer.a import f\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_graph_sees_imports_at_any_depth(toy):
    edges, external = build_graph(toy, ("trainer", "cluster"))
    assert cycles(edges) == [
        ["trainer.a", "trainer.b", "trainer.sub.c", "trainer.a"],
        ["trainer.bad", "trainer.bad.one", "trainer.bad"],
    ]
    assert set(edges["cluster.e"]) == {"trainer", "trainer.a"}
    assert set(edges["trainer.ok.two"]) == {"trainer.ok.three"}
    assert layer_violations(external) == [
        "trainer.d imports ray (trainer/ never imports ray, cluster, launch)"
    ]
