"""The /proc scan shared with a forked child (procfs.SharedScan), on this host's processes:
it finds what one reader finds, a child that fails leaves nothing taken as free, and the
snapshot starts it ahead of the mount tables and starts again when the mounts add a
filesystem. Needs root (every process's descriptors)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safeusb.host import procfs, snapshot
from safeusb.host.model import DevNum, NodeKind
from safeusb.host.roots import Roots
from safeusb.host.selector import Selector, resolve
from tests.host.conftest import Loop, background, held_on_inner_loop, mounted


@pytest.fixture(autouse=True)
def single_threaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan is shared only from a single-threaded process; this one may carry the
    libvirt event loop's thread of an earlier test (libvirt's loop cannot be stopped).
    The child forked here reads /proc and writes to a pipe: it takes none of that
    thread's locks."""
    monkeypatch.setattr(procfs.threading, "active_count", lambda: 1)


def _devnum(raw: int) -> DevNum:
    return (os.major(raw), os.minor(raw))


def _keys(loop: Loop) -> tuple[frozenset[tuple[NodeKind, DevNum]], frozenset[DevNum]]:
    dev = _devnum(os.stat(loop.node).st_rdev)
    return frozenset({("block", dev)}), frozenset({dev})


def _one_reader(roots: Roots, pids: list[int], loop: Loop) -> procfs.ProcessScan:
    nodes, fs = _keys(loop)
    return procfs.scan_processes(roots, pids, nodes, fs, frozenset({os.getpid()}),
                                 share_from=len(pids) + 1)


def test_shared_finds_what_one_reader_finds(loop_ext4: Loop, tmp_path: Path) -> None:
    roots = Roots.host()
    nodes, fs = _keys(loop_ext4)
    with mounted(loop_ext4.node, tmp_path / "m") as mnt, \
            background(["sleep", "600"], cwd=mnt) as a, \
            open(loop_ext4.node, "rb") as node, \
            background(["sleep", "600"], stdin=node) as b:
        pids = procfs.list_pids(roots)
        shared = procfs.start_scan(roots, pids, nodes, fs, frozenset({os.getpid()}),
                                   share_from=1)
        assert shared.child, "the reading was not shared"
        assert len(shared.chunks) > 1
        got = shared.result()
        assert not shared.child  # waited for
        one = _one_reader(roots, pids, loop_ext4)
        assert got == one
        assert {(a.pid, "cwd"), (b.pid, "fd")} <= {(u.pid, u.how) for u in got.uses}


def test_a_child_that_fails_leaves_its_chunks_to_be_read_here(
        loop_ext4: Loop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child cannot send its findings (it exits 1 after reading every chunk it took):
    each of those chunks is read again here, and the findings are those of one reader."""
    roots = Roots.host()
    nodes, fs = _keys(loop_ext4)

    def broken(*_args: object) -> bytes:
        raise ValueError("no")

    with mounted(loop_ext4.node, tmp_path / "m") as mnt, \
            background(["sleep", "600"], cwd=mnt) as a:
        pids = procfs.list_pids(roots)
        # the held process in the child's share: the first chunks, which it takes first
        pids = [a.pid] + [p for p in pids if p != a.pid]
        monkeypatch.setattr(procfs.marshal, "dumps", broken)
        shared = procfs.start_scan(roots, pids, nodes, fs, frozenset({os.getpid()}),
                                   share_from=1)
        assert shared.child
        got = shared.result()
        monkeypatch.undo()
        assert (a.pid, "cwd") in {(u.pid, u.how) for u in got.uses}
        assert got == _one_reader(roots, pids, loop_ext4)


def _count(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[frozenset[DevNum]]]:
    """Shared scans started ahead (the child's pid, 0 for none), and scans run after the
    mount tables (the filesystems asked about)."""
    ahead: list[int] = []
    again: list[frozenset[DevNum]] = []
    start, scan = snapshot.start_scan, snapshot.scan_processes

    def counted_start(*args, **kwargs):  # type: ignore[no-untyped-def]
        shared = start(*args, **kwargs)
        ahead.append(shared.child)
        return shared

    def counted_scan(roots, pids, nodes, fs, *rest, **kwargs):  # type: ignore[no-untyped-def]
        again.append(fs)
        return scan(roots, pids, nodes, fs, *rest, **kwargs)

    monkeypatch.setattr(snapshot, "start_scan", counted_start)
    monkeypatch.setattr(snapshot, "scan_processes", counted_scan)
    monkeypatch.setattr(procfs, "SHARE_FROM", 1)
    monkeypatch.setenv("SAFEUSB_SCAN", "proc")
    return ahead, again


def test_the_proc_scan_ahead_of_the_mount_tables_serves(
        loop_ext4: Loop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    roots = Roots.host()
    target = resolve(Selector.from_string(loop_ext4.node), roots)
    with mounted(loop_ext4.node, tmp_path / "m") as mnt, \
            background(["sleep", "600"], cwd=mnt) as a:
        ahead, again = _count(monkeypatch)
        snap = snapshot.read_snapshot(roots, target)
        assert len(ahead) == 1 and ahead[0] and again == []
        monkeypatch.undo()
        assert {u.pid for u in snap.uses} == {a.pid}
        plain = snapshot.read_snapshot(roots, target, kernel_scan=False)
        assert [u for u in plain.uses if u.pid == a.pid] == list(snap.uses)


def test_a_filesystem_the_mounts_add_is_read_again(
        loop_ext4: Loop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop device backed by a file on the device's filesystem, its own filesystem
    mounted and a file on it held open: the shared scan started ahead did not know that
    filesystem, so it is dropped (its child waited for) and the processes are read again."""
    roots = Roots.host()
    with held_on_inner_loop(loop_ext4.node, tmp_path) as (inner, p):
        target = resolve(Selector.from_string(loop_ext4.node), roots)
        ahead, again = _count(monkeypatch)
        snap = snapshot.read_snapshot(roots, target)
        inner_dev = _devnum(os.stat(inner).st_rdev)
        assert len(ahead) == 1 and ahead[0]
        assert len(again) == 1 and inner_dev in again[0], again
        assert (p.pid, "fd", inner_dev) in {(u.pid, u.how, u.fs) for u in snap.uses}
        with pytest.raises(ChildProcessError):  # the child was waited for
            os.waitpid(ahead[0], os.WNOHANG)
