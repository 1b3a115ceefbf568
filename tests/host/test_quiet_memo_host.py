"""A long-lived reader (safeusbd keeps one Roots) keeps a device's walk and the block
devices between snapshots while no uevent comes, and still sees every change: the
processes and mounts are read each time, a claimed device is read afresh, and a uevent
(a disk's new size) drops what was kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safeusb.host import snapshot
from safeusb.host.roots import Roots
from safeusb.host.selector import Selector, resolve
from safeusb.host.snapshot import read_snapshot
from tests.host.conftest import Loop, background, blank_loop, mounted, run

pytestmark = pytest.mark.host


def _kept(roots: Roots, syspath: str) -> bool:
    return {("walk", syspath), ("blocks",)} <= set(roots.quiet._values)


def test_kept_between_snapshots_yet_every_use_is_seen(loop_ext4: Loop, tmp_path: Path) -> None:
    roots = Roots.host()
    target = resolve(Selector.from_string(loop_ext4.node), roots)
    first = read_snapshot(roots, target)
    assert first.uses == () and first.exclusive_busy == ()
    assert _kept(roots, target.syspath)
    with open(loop_ext4.node, "rb") as held, background(["sleep", "600"], stdin=held) as proc:
        snap = read_snapshot(roots, target)
        assert proc.pid in {u.pid for u in snap.uses}
    with mounted(loop_ext4.node, tmp_path / "m") as mnt:
        snap = read_snapshot(roots, target)
        assert loop_ext4.name in snap.exclusive_busy
        assert [m.mountpoint for ns in snap.namespaces for m in ns.mounts
                if m.devnum == snap.blocks[loop_ext4.name].devnum] == [str(mnt)]
        with background(["sleep", "600"], cwd=mnt) as proc:
            assert ("cwd", str(mnt)) in {(u.how, u.path) for u in
                                         read_snapshot(roots, target).uses if u.pid == proc.pid}


def test_a_uevent_drops_what_was_kept(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with blank_loop(image, 16 << 20) as node:
        roots = Roots.host()
        target = resolve(Selector.from_string(node), roots)
        name = os.path.basename(node)

        def size() -> int:
            return read_snapshot(roots, target).blocks[name].size_bytes

        assert size() == 16 << 20
        with open(image, "r+b") as f:  # grown behind the kernel's back: no uevent yet
            f.truncate(32 << 20)
        assert size() == 16 << 20
        assert _kept(roots, target.syspath)
        run("losetup", "--set-capacity", node)  # the kernel tells: a change uevent
        assert size() == 32 << 20


def test_mounted_after_the_probe_is_still_looked_at_whole(
        loop_ext4: Loop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim is probed before the mount tables are read: a filesystem mounted in
    between shows in them, and then its files and directories are looked for too."""
    roots = Roots.host()
    target = resolve(Selector.from_string(loop_ext4.node), roots)
    with mounted(loop_ext4.node, tmp_path / "m") as mnt, \
            background(["sleep", "600"], cwd=mnt) as proc:
        monkeypatch.setattr(snapshot, "_probe_exclusive", lambda roots, names: ())
        snap = read_snapshot(roots, target)
        assert ("cwd", str(mnt)) in {(u.how, u.path) for u in snap.uses if u.pid == proc.pid}
