"""The package's import graph has no circles but the known ones.

Every module of the package is parsed with ``ast``; every import counts, wherever it is
written: at the top, under ``if TYPE_CHECKING:``, or inside a function (a deferred import
is still a dependency of the design). Relative imports are resolved against the module's
package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import safeusb

PACKAGE = "safeusb"
ROOT = Path(safeusb.__file__).parent

# Circles allowed to exist, each as the sorted tuple of its modules: none. A circle not
# named here fails the test, and so does a name here that no longer is a circle.
KNOWN_CIRCLES: frozenset[tuple[str, ...]] = frozenset()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` in ``importer``."""
    base = importer.split(".")
    if not is_package:
        base.pop()
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (itself excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def add(target: str) -> None:
        # "a.b.c" names module a.b.c if it is one, else the nearest enclosing module.
        parts = target.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in known:
                out.add(candidate)
                return
            parts.pop()

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve(name, is_package, node.level, node.module)
            elif node.module and (node.module == PACKAGE
                                  or node.module.startswith(PACKAGE + ".")):
                base = node.module
            else:
                continue
            for alias in node.names:  # "from . import sysfs" imports a module
                if f"{base}.{alias.name}" in known:
                    add(f"{base}.{alias.name}")
                else:
                    add(base)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def circles(edges: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each as a
    sorted tuple."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    """The reader sees every kind of import (a guard against a test that passes because
    it reads nothing)."""
    edges = graph()
    assert "safeusb.inspect.decide" in edges["safeusb.handover.plan"]  # from a.b import ...
    assert "safeusb.host.sysfs" in edges["safeusb.status"]  # from safeusb.host import sysfs
    assert "safeusb.host.runner" in edges["safeusb.status"]  # under TYPE_CHECKING
    assert "safeusb.host.snapshot" in edges["safeusb.status"]  # inside a function


def test_circles_are_found() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert circles(edges) == {("a", "b", "c")}


def test_no_import_circle_but_the_known_ones() -> None:
    found = circles(graph())
    new = sorted(found - KNOWN_CIRCLES)
    assert not new, f"import circles: {new}"
    gone = sorted(KNOWN_CIRCLES - found)
    assert not gone, f"no longer circles, take them out of KNOWN_CIRCLES: {gone}"


# The floors of the package (safeusb/__init__.py): a module imports its own floor and the
# ones below it, never one above. The shared vocabulary is the ground floor.
VOCABULARY = {"errors", "reasons", "textout", "strictjson", "trust", "hostdev", "values"}
FLOORS = ("vocabulary", "host", "inspect", "handover", "front ends")


def floor(module: str) -> int:
    parts = module.split(".")[1:]
    if not parts:
        return 0  # the package itself: its version only
    if len(parts) == 1 and parts[0] in VOCABULARY:
        return 0
    if parts[0] in ("host", "inspect", "handover"):
        return FLOORS.index(parts[0])
    return len(FLOORS) - 1  # gate/, safeusbd/, lab/, the commands


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({FLOORS[floor(a)]}) imports {b} ({FLOORS[floor(b)]})"
                  for a, targets in edges.items() for b in targets if floor(b) > floor(a))


def test_floors_are_told_apart() -> None:
    assert floor("safeusb.errors") == 0 and floor("safeusb.host.sysfs") == 1
    assert floor("safeusb.handover.plan") == 3 and floor("safeusb.cli") == 4
    assert floor("safeusb.gate.proxy") == 4 and floor("safeusb.hook") == 4
    assert upward({"safeusb.host.runner": {"safeusb.handover.steps"}}) == [
        "safeusb.host.runner (host) imports safeusb.handover.steps (handover)"]


def test_no_module_imports_a_floor_above_its_own() -> None:
    edges = graph()
    assert set(VOCABULARY) <= {m.split(".", 1)[1] for m in edges if "." in m}
    assert not upward(edges), "imports going up a floor:\n" + "\n".join(upward(edges))


def test_each_package_says_what_it_holds_and_may_import() -> None:
    for init in sorted(ROOT.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "import" in doc.lower(), f"{init}: its docstring does not say what it may import"
