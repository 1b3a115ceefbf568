"""Build the distribution packages from this checkout, outside it.

The working tree (tracked files and new ones git does not ignore) is copied into a
temporary directory and built there, so nothing lands in the checkout: the .deb with
``dpkg-buildpackage -b -us -uc`` (checked with ``lintian``), the wheel and sdist with
``python3 -m build``, the RPMs with ``rpmbuild -bb`` from the sdist. Each is built once
per test session, on first use, and its build time kept for the summary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The distribution's tools, never a developer's pyenv or virtual environment.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = {
    "deb": ("dpkg-buildpackage", "dh", "dh_python3", "lintian"),
    "dist": ("python3",),
    "rpm": ("rpmbuild", "rpm2cpio", "cpio", "checkmodule", "semodule_package"),
}


class BuildFailed(Exception):
    pass


def missing_tools(kind: str) -> list[str]:
    found = [t for t in TOOLS[kind] if shutil.which(t, path=SYSTEM_PATH) is None]
    if kind in ("dist", "rpm"):
        for module in ("build", "installer"):
            probe = subprocess.run(["/usr/bin/python3", "-c", f"import {module}"],
                                   capture_output=True, check=False)
            if probe.returncode != 0:
                found.append(f"python3-{module}")
    return found


def _env(home: Path) -> dict[str, str]:
    return {"PATH": SYSTEM_PATH, "HOME": str(home), "LC_ALL": "C.UTF-8",
            "SOURCE_DATE_EPOCH": str(int(time.time()))}


def _run(argv: list[str], cwd: Path, home: Path, log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(argv, cwd=cwd, env=_env(home), stdout=f,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              check=False, timeout=900)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-25:]
        raise BuildFailed(f"{' '.join(argv)} failed (exit {proc.returncode}):\n"
                          + "\n".join(tail))


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it, without ignored files (.venv, caches)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout
    dest.mkdir(parents=True)
    pack = subprocess.Popen(["tar", "--null", "-T", "-", "-cf", "-"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    unpack = subprocess.Popen(["tar", "-xf", "-"], cwd=dest, stdin=pack.stdout)
    assert pack.stdin is not None and pack.stdout is not None
    pack.stdout.close()
    pack.stdin.write(b"".join(f + b"\0" for f in files.split(b"\0")
                              if f and os.path.lexists(ROOT / os.fsdecode(f))))
    pack.stdin.close()
    if pack.wait() != 0 or unpack.wait() != 0:
        raise BuildFailed("copying the working tree failed")


class Packages:
    """Packages built from this checkout in a temporary directory, each on first use."""

    def __init__(self, workdir: Path | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="safeusb-pkg-"))
        self.seconds: dict[str, float] = {}

    def _timed(self, name: str, argv: list[str], cwd: Path, log: str) -> None:
        start = time.monotonic()
        try:
            _run(argv, cwd, self.workdir, self.workdir / log)
        finally:
            self.seconds[name] = time.monotonic() - start

    @cached_property
    def deb(self) -> Path:
        """safeusb_VERSION_all.deb, built by dpkg-buildpackage -b -us -uc."""
        out = self.workdir / "deb"
        copy_tree(out / "src")
        self._timed("dpkg-buildpackage", ["dpkg-buildpackage", "-b", "-us", "-uc"],
                    out / "src", "deb/build.log")
        debs = sorted(out.glob("safeusb_*_all.deb"))
        if len(debs) != 1:
            raise BuildFailed(f"dpkg-buildpackage made {debs!r}, not one safeusb .deb")
        return debs[0]

    @cached_property
    def lintian(self) -> str:
        """lintian's findings on the binary build (overridden tags are not shown)."""
        changes = next(self.deb.parent.glob("safeusb_*.changes"))
        start = time.monotonic()
        proc = subprocess.run(["lintian", "--pedantic", "--display-info",
                               "--fail-on", "error,warning", str(changes)],
                              capture_output=True, text=True, env=_env(self.workdir),
                              check=False, timeout=600)
        self.seconds["lintian"] = time.monotonic() - start
        if proc.returncode not in (0, 1):
            raise BuildFailed(f"lintian failed (exit {proc.returncode}): {proc.stderr}")
        return proc.stdout + (f"\n(lintian exit {proc.returncode})"
                              if proc.returncode else "")

    @cached_property
    def _dist(self) -> tuple[Path, Path]:
        src = self.workdir / "dist" / "src"
        copy_tree(src)
        self._timed("python3 -m build", ["/usr/bin/python3", "-m", "build", "--no-isolation",
                                          "--outdir", "../out", "."], src, "dist/build.log")
        out = self.workdir / "dist" / "out"
        wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
        if len(wheels) != 1 or len(sdists) != 1:
            raise BuildFailed(f"python3 -m build made {sorted(out.iterdir())!r}")
        return wheels[0], sdists[0]

    @property
    def wheel(self) -> Path:
        return self._dist[0]

    @property
    def sdist(self) -> Path:
        return self._dist[1]

    @cached_property
    def rpms(self) -> list[Path]:
        """The RPMs rpmbuild -bb makes from the sdist (their dependencies are the target
        distribution's, not checked here: --nodeps)."""
        top = self.workdir / "rpm"
        (top / "SOURCES").mkdir(parents=True)
        shutil.copy(self.sdist, top / "SOURCES")
        self._timed("rpmbuild", ["rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {top}",
                                 str(ROOT / "packaging" / "safeusb.spec")], top,
                    "rpm/build.log")
        return sorted((top / "RPMS").rglob("*.rpm"))

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
