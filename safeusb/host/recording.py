"""Reading a recorded tree (tools/record-fixtures) where the live system would be asked.

A recording keeps /proc's links as the kernel showed them ("/dev/sda", "/srv/file"),
which name things on the machine that was recorded, not this one. Device nodes come from
dev-nodes.txt ("b 8:1 /dev/sda1"); a file's filesystem is the mount, in the process's
own mount table, whose mountpoint is the longest prefix of its path.
"""

from __future__ import annotations

import functools
import os
import stat

from safeusb.host.model import DevNum, MountEntry
from safeusb.host.parsers import ParseError, parse_devnum, parse_mountinfo
from safeusb.host.roots import Roots
from safeusb.values import frozen


@frozen
class RecordedStat:
    st_mode: int
    st_rdev: int
    st_dev: int


@functools.lru_cache(maxsize=16)
def node_table(dev_root: str) -> dict[str, tuple[str, DevNum]]:
    """Device node path -> ("block"|"char", devnum), from the recording's dev-nodes.txt."""
    path = os.path.join(os.path.dirname(dev_root), "dev-nodes.txt")
    table: dict[str, tuple[str, DevNum]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except OSError:
        return table
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] in ("b", "c"):
            try:
                table[parts[2]] = ("block" if parts[0] == "b" else "char", parse_devnum(parts[1]))
            except ParseError:
                continue
    return table


def is_recording(roots: Roots) -> bool:
    """A tree with dev-nodes.txt; built trees for tests link to this machine's files."""
    return not roots.live and os.path.exists(
        os.path.join(os.path.dirname(roots.dev), "dev-nodes.txt"))


def node(roots: Roots, path: str) -> tuple[str, DevNum] | None:
    return node_table(roots.dev).get(os.path.normpath(path))


class Stater:
    """stat() of /proc/PID links in a recording."""

    def __init__(self, roots: Roots) -> None:
        self.roots = roots
        self.nodes = node_table(roots.dev)
        self.mounts: dict[int, tuple[MountEntry, ...]] = {}

    def _mounts(self, pid: int) -> tuple[MountEntry, ...]:
        if pid not in self.mounts:
            try:
                with open(self.roots.proc_path(str(pid), "mountinfo"), encoding="utf-8") as f:
                    self.mounts[pid] = parse_mountinfo(f.read())
            except (OSError, ParseError):
                self.mounts[pid] = ()
        return self.mounts[pid]

    def stat(self, pid: int, target: str) -> RecordedStat | None:
        if not target.startswith("/"):
            return None  # socket:[..], pipe:[..], anon_inode:..
        found = self.nodes.get(target)
        if found is not None:
            kind, (major, minor) = found
            mode = stat.S_IFBLK if kind == "block" else stat.S_IFCHR
            return RecordedStat(mode, os.makedev(major, minor), 0)
        best: MountEntry | None = None
        for m in self._mounts(pid):
            mp = m.mountpoint.rstrip("/") or "/"
            if target == mp or target.startswith(mp.rstrip("/") + "/") or mp == "/":
                if best is None or len(mp) >= len(best.mountpoint.rstrip("/") or "/"):
                    best = m
        if best is None:
            return None
        return RecordedStat(stat.S_IFREG, 0, os.makedev(*best.devnum))
