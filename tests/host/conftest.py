"""Real host kernel objects: loop devices, mounts in private namespaces, swap, processes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_root


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


@dataclass
class Loop:
    node: str
    image: Path

    @property
    def name(self) -> str:
        return os.path.basename(self.node)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.stdout)

    def reasons(self, kind: str) -> list[dict]:  # type: ignore[type-arg]
        return [r for r in self.json["reasons"] if r["kind"] == kind]


@pytest.fixture
def inspect(safeusb_cmd: list[str]):  # type: ignore[no-untyped-def]
    def _inspect(*args: str) -> Result:
        p = subprocess.run(
            [*safeusb_cmd, "inspect", *args], capture_output=True, text=True, timeout=60
        )
        assert "Traceback" not in p.stderr, p.stderr
        return Result(p.returncode, p.stdout, p.stderr)

    return _inspect


def _attach(image: Path) -> str:
    return run("losetup", "--find", "--show", str(image)).stdout.strip()


@contextlib.contextmanager
def blank_loop(image: Path, size: int) -> Iterator[str]:
    """A loop device on a new sparse file of ``size`` bytes, detached afterwards."""
    require_root()
    with open(image, "wb") as f:
        f.truncate(size)
    node = _attach(image)
    try:
        yield node
    finally:
        run("losetup", "-d", node, check=False)


@pytest.fixture
def loop_ext4(tmp_path: Path) -> Iterator[Loop]:
    require_root()
    image = tmp_path / "stick.img"
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    # Inode tables and journal written now: no ext4lazyinit writing in the background
    # once it is mounted (tests compare the device's dirty and writeback counters).
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
    node = _attach(image)
    try:
        yield Loop(node, image)
    finally:
        run("losetup", "-d", node, check=False)


@contextlib.contextmanager
def mounted(node: str, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    run("mount", node, str(where))
    try:
        yield where
    finally:
        for _ in range(50):
            if run("umount", str(where), check=False).returncode == 0:
                break
            time.sleep(0.1)


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@contextlib.contextmanager
def background(argv: list[str], **kwargs) -> Iterator[subprocess.Popen[bytes]]:  # type: ignore[no-untyped-def]
    proc = subprocess.Popen(argv, **kwargs)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def held_on_inner_loop(outer_node: str, where: Path
                       ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``outer_node`` mounted, a loop device backed by a file on it with a filesystem of its
    own mounted, and a process holding a file on that open: (the inner loop's node, the
    process)."""
    with mounted(outer_node, where / "outer") as outer:
        inner_img = outer / "inner.img"
        with open(inner_img, "wb") as f:
            f.truncate(16 * 1024 * 1024)
        run("mkfs.ext4", "-q", "-F", str(inner_img))
        inner = _attach(inner_img)
        try:
            with mounted(inner, where / "inner") as mnt:
                (mnt / "held").write_bytes(b"h")
                with open(mnt / "held", "rb") as held_fd, \
                        background(["sleep", "600"], stdin=held_fd) as p:
                    yield inner, p
        finally:
            run("losetup", "-d", inner, check=False)
