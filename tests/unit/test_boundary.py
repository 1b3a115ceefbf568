"""The system boundary (safeusb/host/) is the only part of the package that calls libvirt
or names a path under /proc, /sys, /dev or /run, literally or built from the system's
roots.

Read with ``ast``: every string constant counts (f-string parts included) but docstrings,
which describe; every import and every ``libvirt.NAME`` counts wherever it is written.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import safeusb

ROOT = Path(safeusb.__file__).parent
# The boundary: the system, live or recorded; lab/ is the demo's VM, not the product's.
INSIDE = ("host", "lab")
# A path built from the roots is a read of the system too.
ROOTS_PATHS = {"sys_path", "proc_path", "dev_path", "to_host_sys"}
ROOTS_DIRS = {"sys", "proc", "dev", "debugfs"}
# Whether a system is live or recorded is the boundary's own question (Roots.own_kernel is
# what a front end may ask: whether this host's kernel and services answer).
RECORDED = {"live", "is_recording"}
SYSTEM_PATH = re.compile(r"(?<![\w.~-])/(proc|sys|dev|run)(/|$)")


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef
                      | ast.ClassDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def offences(path: Path, source: str | None = None) -> list[str]:
    """What ``path`` (or ``source`` as if it were there) does across the boundary."""
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source)
    skip = _docstrings(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in skip and SYSTEM_PATH.search(node.value):
            found.append((node.lineno, f"path {node.value[:60]!r}"))
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "libvirt"
                                                  for a in node.names):
            found.append((node.lineno, "import libvirt"))
        elif isinstance(node, ast.ImportFrom) and not node.level \
                and (node.module or "").split(".")[0] == "libvirt":
            found.append((node.lineno, "from libvirt import"))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "libvirt":
            found.append((node.lineno, f"libvirt.{node.attr}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ROOTS_PATHS:
            found.append((node.lineno, f"{node.func.attr}()"))
        elif isinstance(node, ast.Attribute) and node.attr in ROOTS_DIRS and (
                (isinstance(node.value, ast.Name) and node.value.id == "roots")
                or (isinstance(node.value, ast.Attribute) and node.value.attr == "roots")):
            found.append((node.lineno, f"roots.{node.attr}"))
        elif isinstance(node, ast.Attribute) and node.attr in RECORDED and (
                (isinstance(node.value, ast.Name) and node.value.id == "roots")
                or (isinstance(node.value, ast.Attribute) and node.value.attr == "roots")):
            found.append((node.lineno, f"roots.{node.attr}"))
        elif isinstance(node, ast.Name) and node.id == "is_recording":
            found.append((node.lineno, node.id))
    return [f"line {n}: {what}" for n, what in sorted(found)]


def outside() -> dict[str, list[str]]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in INSIDE:
            continue
        if found := offences(path):
            out[str(rel)] = found
    return out


def test_offences_are_seen(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("")
    src = ('"""Reads /proc/mounts."""\n'
           'import libvirt\n'
           'x = f"/proc/{1}/fd"\n'
           'y = libvirt.open\n'
           'z = "/run/safeusb"\n'
           'w = "/srv/proc/x"\n'
           'v = "/dev"\n'
           'u = roots.sys_path("bus")\n'
           't = self.roots.proc\n'
           's = device.sys_path\n'
           'r = roots.live or is_recording(roots)\n')
    assert offences(f, src) == [
        "line 2: import libvirt", "line 3: path '/proc/'", "line 4: libvirt.open",
        "line 5: path '/run/safeusb'", "line 7: path '/dev'", "line 8: sys_path()",
        "line 9: roots.proc", "line 11: is_recording", "line 11: roots.live"]


def test_the_boundary_is_read() -> None:
    """The host package itself is full of them: the reader is not blind."""
    assert offences(ROOT / "host" / "virt.py")
    assert offences(ROOT / "host" / "roots.py")


def test_nothing_outside_the_host_calls_libvirt_or_names_a_system_path() -> None:
    found = outside()
    assert not found, "across the boundary:\n" + "\n".join(
        f"{m}: {line}" for m, lines in found.items() for line in lines)
