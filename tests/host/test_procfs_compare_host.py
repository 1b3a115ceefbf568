"""The /proc scan against the reference scan it replaced (tests/procfs_reference.py), on
live kernel objects: a loop ext4 mounted on the host and in a private mount namespace,
and processes that hold it every way the scan looks for (a descriptor of a file, a memory
map of a file whose descriptor was closed, working directory, root directory, the block
node held open), among every other process of the host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from safeusb.host import procfs
from safeusb.host.roots import Roots
from tests import procfs_reference as reference
from tests.host.conftest import Loop, background, mounted, wait_for

HOLD = """
import mmap, os, sys, time
mnt = sys.argv[1]
with open(os.path.join(mnt, "mapped"), "r+b") as f:
    m = mmap.mmap(f.fileno(), 0)          # the map stays, the descriptor goes
held = open(os.path.join(mnt, "held"), "rb")
print("ready", flush=True)
time.sleep(600)
"""

CHROOT = """
import os, sys, time
os.chroot(sys.argv[1])
print("ready", flush=True)
time.sleep(600)
"""


def _scans(roots: Roots, pids: list[int], nodes: frozenset, fs: frozenset):  # type: ignore[no-untyped-def,type-arg]
    new_ns = procfs.read_mount_namespaces(roots, pids)
    old_ns = reference.read_mount_namespaces(roots, pids)
    new = procfs.scan_processes(roots, pids, nodes, fs, frozenset({os.getpid()}))
    old = reference.scan_processes(roots, pids, nodes, fs, frozenset({os.getpid()}))
    return new_ns, old_ns, new, old


def test_live_scan_matches_reference(loop_ext4: Loop, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    roots = Roots.host()
    st = os.stat(loop_ext4.node)
    dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    nodes = frozenset({("block", dev)})
    fs = frozenset({dev})
    with mounted(loop_ext4.node, tmp_path / "m") as mnt:
        (mnt / "mapped").write_bytes(b"m" * 4096)
        (mnt / "held").write_bytes(b"h")
        (mnt / "cwd").mkdir()
        private = tmp_path / "private"
        private.mkdir()
        script = f"mount {loop_ext4.node} {private} && cd {private} && echo ready && exec sleep 600"
        with open(loop_ext4.node, "rb") as node_fd, \
                background([sys.executable, "-c", HOLD, str(mnt)], stdout=subprocess.PIPE) as a, \
                background([sys.executable, "-c", CHROOT, str(mnt)],
                           stdout=subprocess.PIPE) as b, \
                background(["sleep", "600"], cwd=mnt / "cwd") as c, \
                background(["sleep", "600"], stdin=node_fd) as d, \
                background(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                           stdout=subprocess.PIPE) as e:
            for p in (a, b, e):
                assert p.stdout is not None
                assert p.stdout.readline().strip() == b"ready"
            ours = [a.pid, b.pid, c.pid, d.pid, e.pid]
            # Settled: the shell in the private namespace has become sleep (its name and
            # maps would otherwise change between the two scans).
            wait_for(lambda: Path(f"/proc/{e.pid}/comm").read_text().strip() == "sleep")

            # Only the processes built here, this one and pid 1 (whose namespace links
            # may be denied even to root, in a container): nothing else can change
            # between the two scans.
            new_ns, old_ns, new, old = _scans(roots, sorted([1, os.getpid(), *ours]), nodes, fs)
            assert new_ns.namespaces == old_ns.namespaces
            assert new_ns.unreadable == old_ns.unreadable
            assert {ns.inode for ns in new_ns.namespaces} >= {
                int(os.readlink(f"/proc/{e.pid}/ns/mnt")[5:-1]),
                int(os.readlink("/proc/self/ns/mnt")[5:-1])}
            assert new.uses == old.uses
            assert new.unreadable == old.unreadable
            got = {(u.pid, u.how) for u in new.uses}
            assert {(a.pid, "fd"), (a.pid, "mmap"), (b.pid, "root"), (c.pid, "cwd"),
                    (d.pid, "fd"), (e.pid, "cwd")} <= got, got

            # Every process of the host: the uses are of this device only, so they are
            # the same in both scans however the rest of the host changes meanwhile.
            pids = procfs.list_pids(roots)
            _, _, new_all, old_all = _scans(roots, pids, nodes, fs)
            assert new_all.uses == old_all.uses
            assert {(u.pid, u.how) for u in new_all.uses} == got

            # The same read in two halves, the second by a forked child, with the
            # processes built here in the child's half, then in this process's: the same
            # findings.
            others = [p for p in pids if p not in ours]
            # (this process may carry the libvirt event loop's thread of an earlier test:
            # see test_procfs_shared_host.single_threaded)
            monkeypatch.setattr(procfs.threading, "active_count", lambda: 1)
            for order in (others + ours, ours + others):
                halves = procfs.scan_processes(roots, order, nodes, fs,
                                               frozenset({os.getpid()}), share_from=1)
                assert halves.uses == new_all.uses
                assert halves.unreadable == new_all.unreadable
