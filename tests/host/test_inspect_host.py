"""safeusb inspect against real host kernel objects (root): loop devices stand in for sticks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.host.conftest import Loop, background, blank_loop, mounted, run, wait_for

pytestmark = pytest.mark.host


def _own_mnt_ns() -> int:
    return int(os.readlink("/proc/self/ns/mnt")[5:-1])


def test_idle_loop_device_is_free(inspect, loop_ext4: Loop) -> None:
    r = inspect(loop_ext4.node, "--json")
    assert r.code == 0, r.stdout
    assert r.json["free"] is True
    assert r.json["reasons"] == []
    disk = next(b for b in r.json["block_devices"] if b["name"] == loop_ext4.name)
    # Figures are read (not unknown); loop devices keep their counters across attachments,
    # so a few KiB of per-CPU counter drift may show, and is reported as a note.
    assert isinstance(disk["dirty_bytes"], int) and isinstance(disk["writeback_bytes"], int)
    text = inspect(loop_ext4.node)
    assert text.code == 0 and "can be handed over now" in text.stdout


def test_mounted_only_in_private_namespace(inspect, loop_ext4: Loop, tmp_path: Path) -> None:
    mnt = tmp_path / "private"
    mnt.mkdir()
    script = f"mount {loop_ext4.node} {mnt} && exec sleep 600"
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
    with background(argv) as proc:
        wait_for(lambda: str(mnt) in Path(f"/proc/{proc.pid}/mountinfo").read_text())
        # Not visible here: our own namespace has no such mount.
        assert str(mnt) not in Path("/proc/self/mountinfo").read_text()
        r = inspect(loop_ext4.node, "--json")
        assert r.code == 1
        mounts = r.reasons("mount")
        assert [m["mountpoint"] for m in mounts] == [str(mnt)]
        assert mounts[0]["mnt_ns"] != _own_mnt_ns()
        assert mounts[0]["fstype"] == "ext4"
        text = inspect(loop_ext4.node)
        assert f"mounted at {mnt} in mount namespace {mounts[0]['mnt_ns']}" in text.stdout


def test_swap_on_loop_device(inspect, tmp_path: Path) -> None:
    with blank_loop(tmp_path / "swap.img", 32 * 1024 * 1024) as node:
        run("mkswap", node)
        run("swapon", node)
        try:
            r = inspect(node, "--json")
            assert r.code == 1
            swaps = r.reasons("swap")
            assert len(swaps) == 1 and swaps[0]["filename"] == node
            assert "active swap" in inspect(node).stdout
        finally:
            run("swapoff", node)


def test_process_holding_the_node(inspect, loop_ext4: Loop) -> None:
    with open(loop_ext4.node, "rb") as held, background(["sleep", "600"], stdin=held) as proc:
        r = inspect(loop_ext4.node, "--json")
        assert r.code == 1
        opens = {o["pid"]: o for o in r.reasons("open")}
        # This test process holds it too, through the file object it passed on.
        assert set(opens) == {proc.pid, os.getpid()}
        assert opens[proc.pid]["comm"] == "sleep"
        assert f"pid {proc.pid} (sleep) has {loop_ext4.node} open" in inspect(loop_ext4.node).stdout


def test_exclusive_claim_by_a_process(inspect, loop_ext4: Loop) -> None:
    code = (
        "import os,sys,time; os.open(sys.argv[1], os.O_RDONLY|os.O_EXCL); "
        "print('ready', flush=True); time.sleep(600)"
    )
    with background([sys.executable, "-c", code, loop_ext4.node], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        r = inspect(loop_ext4.node, "--json")
        assert r.code == 1
        assert proc.pid in [o["pid"] for o in r.reasons("open")]


def test_file_open_cwd_and_dirty_data(inspect, loop_ext4: Loop, tmp_path: Path) -> None:
    saved = {k: Path(f"/proc/sys/vm/{k}").read_text() for k in
             ("dirty_writeback_centisecs", "dirty_expire_centisecs")}
    Path("/proc/sys/vm/dirty_writeback_centisecs").write_text("0")
    Path("/proc/sys/vm/dirty_expire_centisecs").write_text("360000")
    try:
        with mounted(loop_ext4.node, tmp_path / "m") as mnt:
            data = mnt / "data.bin"
            with open(data, "wb") as f:
                f.write(os.urandom(4 * 1024 * 1024))
            with open(data, "rb") as held, background(
                ["sleep", "600"], stdin=held, cwd=mnt
            ) as proc:
                r = inspect(loop_ext4.node, "--json")
                assert r.code == 1
                (mount,) = r.reasons("mount")
                assert mount["mountpoint"] == str(mnt) and mount["mnt_ns"] == _own_mnt_ns()
                (use,) = [o for o in r.reasons("open") if o["pid"] == proc.pid]
                hows = {(u["how"], u["path"]) for u in use["uses"]}
                assert ("fd", str(data)) in hows and ("cwd", str(mnt)) in hows
                dirty = sum(b["dirty_bytes"] or 0 for b in r.json["block_devices"])
                assert dirty >= 1024 * 1024, r.json["dirty"]
                (d,) = r.reasons("dirty")
                assert d["dirty_bytes"] >= 1024 * 1024
                assert "dirty, " in inspect(loop_ext4.node).stdout
            run("sync")
    finally:
        for k, v in saved.items():
            Path(f"/proc/sys/vm/{k}").write_text(v)


def test_lazily_unmounted_filesystem_still_used(inspect, loop_ext4: Loop,
                                               tmp_path: Path) -> None:
    """A filesystem detached with `umount -l` is named in no mount table, yet lives on while
    a process works in it: its claim on the device sends the scan after the filesystem's
    files and directories too (an unclaimed device is scanned for its nodes alone)."""
    mnt = tmp_path / "m"
    mnt.mkdir()
    run("mount", loop_ext4.node, str(mnt))
    try:
        (mnt / "kept").write_bytes(b"x")
        with background(["sleep", "600"], cwd=mnt) as proc:
            run("umount", "-l", str(mnt))
            r = inspect(loop_ext4.node, "--json")
            assert r.code == 1, r.stdout
            assert r.reasons("mount") == []
            (use,) = [o for o in r.reasons("open") if o["pid"] == proc.pid]
            assert [u["how"] for u in use["uses"]] == ["cwd"]
        r = inspect(loop_ext4.node, "--json")
        assert r.json["free"] is True, r.stdout
    finally:
        run("umount", str(mnt), check=False)


def test_loop_backed_by_a_file_on_it(inspect, loop_ext4: Loop, tmp_path: Path) -> None:
    with mounted(loop_ext4.node, tmp_path / "m") as mnt:
        inner = mnt / "inner.img"
        with open(inner, "wb") as f:
            f.truncate(8 * 1024 * 1024)
        node = run("losetup", "--find", "--show", str(inner)).stdout.strip()
        try:
            r = inspect(loop_ext4.node, "--json")
            assert r.code == 1
            holders = r.reasons("holder")
            assert [(h["holder"], h["holder_kind"]) for h in holders] == [
                (os.path.basename(node), "loop")
            ]
        finally:
            run("losetup", "-d", node)


@pytest.mark.parametrize(
    "selector", ["dead:beef", "2-1", "002:003", "not-a-device", "/dev/null", "/dev/nonexistent"]
)
def test_bad_or_absent_selectors_exit_2(inspect, selector: str) -> None:
    r = inspect(selector)
    assert r.code == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("safeusb: ") and len(r.stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2(inspect, tmp_path: Path) -> None:
    assert inspect().code == 2
    bad = tmp_path / "bad.xml"
    bad.write_text("<hostdev mode='subsystem' type='usb'><source><vendor id='zz'/>")
    r = inspect("--xml", str(bad))
    assert r.code == 2 and "not well-formed" in r.stderr


def test_reading_never_mounts_debugfs_and_acting_does(loop_ext4: Loop, tmp_path: Path) -> None:
    """read_snapshot only reads: without debugfs it reports the dirty-page figures as
    unreadable; Runner.ensure_debugfs, which every caller that acts or reports calls first,
    mounts it."""
    require_root()
    from dataclasses import replace  # noqa: PLC0415

    from safeusb.host.roots import Roots  # noqa: PLC0415
    from safeusb.host.runner import Runner  # noqa: PLC0415
    from safeusb.host.selector import Selector, resolve  # noqa: PLC0415
    from safeusb.host.snapshot import read_snapshot  # noqa: PLC0415

    where = tmp_path / "debugfs"
    where.mkdir()
    roots = replace(Roots.host(), debugfs=str(where))
    target = resolve(Selector.from_string(loop_ext4.node), roots)
    snap = read_snapshot(roots, target)
    assert not os.path.ismount(where)
    assert snap.dirty and all(d.dirty_bytes is None and "debugfs is not mounted" in (d.error or "")
                              for d in snap.dirty), snap.dirty
    try:
        Runner.for_roots(roots).ensure_debugfs(roots)
        assert os.path.ismount(where)
        snap = read_snapshot(roots, target)
        assert snap.dirty and all(d.dirty_bytes is not None for d in snap.dirty), snap.dirty
    finally:
        subprocess.run(["umount", str(where)], check=False)
