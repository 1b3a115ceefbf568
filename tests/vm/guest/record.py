"""Record, inside the guest, the parts of sysfs, procfs and debugfs that safeusb reads.

Usage: record.py DEST

Layout (what safeusb's Roots.from_recording expects): DEST/sys, DEST/proc, DEST/debug.
Regular files are copied when small and text; symlinks stay symlinks with their
own (relative, for sysfs) targets, so links into the recorded tree keep working.
Kernel threads are left out of proc; maps keep only lines on a real block device.
Device nodes are listed in DEST/dev-nodes.txt (git cannot hold them).
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Iterable

MAX_FILE = 64 * 1024
SKIP_DIRS = {"power", "trace", "mq", "queue", "integrity", "subsystem", "driver", "firmware_node"}
SYS_LINK_DIRS = ("bus/usb/devices", "class/block", "block", "dev/block")
PROC_FILES = ("comm", "mountinfo")
PROC_LINKS = ("ns/mnt", "cwd", "root")
MAPS_DEVICE = re.compile(r"^\S+ \S+ \S+ ([0-9a-f]+):[0-9a-f]+ ")


def read_small_text(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError:
        return None
    if len(data) > MAX_FILE or b"\0" in data:
        return None
    return data


def write(dest: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "wb") as f:
        f.write(data)


def link(dest: str, target: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if not os.path.lexists(dest):
        os.symlink(target, dest)


def copy_tree(src: str, dest: str) -> None:
    """Copy a sysfs directory: small text files, symlinks as symlinks, no loops."""
    for dirpath, dirnames, filenames in os.walk(src):
        out = os.path.join(dest, os.path.relpath(dirpath, "/"))
        os.makedirs(out, exist_ok=True)
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                link(os.path.join(out, d), os.readlink(full))
            elif d not in SKIP_DIRS:
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                link(os.path.join(out, name), os.readlink(full))
                continue
            data = read_small_text(full)
            if data is not None:
                write(os.path.join(out, name), data)


def record_sys(dest: str) -> None:
    roots: set[str] = set()
    for rel in SYS_LINK_DIRS:
        base = os.path.join("/sys", rel)
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            full = os.path.join(base, name)
            if os.path.islink(full):
                link(os.path.join(dest, "sys", rel, name), os.readlink(full))
                roots.add(os.path.realpath(full))
    # The whole USB tree of each controller, so hubs, interfaces, SCSI hosts,
    # disks, partitions and their class nodes come along.
    for r in list(roots):
        m = re.match(r"(.*?/usb\d+)(/|$)", r)
        if m:
            roots.add(m.group(1))
    for r in sorted(roots):
        if not any(r != o and r.startswith(o + "/") for o in roots):
            copy_tree(r, dest)
    possible = read_small_text("/sys/devices/system/cpu/possible")
    if possible is not None:
        write(os.path.join(dest, "sys/devices/system/cpu/possible"), possible)


def user_pids() -> Iterable[str]:
    """Processes other than kernel threads (those have an empty command line)."""
    for name in sorted(os.listdir("/proc"), key=lambda n: (len(n), n)):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if f.read(1):
                    yield name
        except OSError:
            continue


def record_proc(dest: str) -> None:
    proc = os.path.join(dest, "proc")
    for pid in user_pids():
        base = f"/proc/{pid}"
        for name in PROC_FILES:
            data = read_small_text(os.path.join(base, name))
            if data is not None:
                write(os.path.join(proc, pid, name), data)
        for name in PROC_LINKS:
            try:
                link(os.path.join(proc, pid, name), os.readlink(os.path.join(base, name)))
            except OSError:
                continue
        try:
            fds = os.listdir(os.path.join(base, "fd"))
        except OSError:
            fds = []
        os.makedirs(os.path.join(proc, pid, "fd"), exist_ok=True)
        for fd in fds:
            try:
                link(os.path.join(proc, pid, "fd", fd), os.readlink(os.path.join(base, "fd", fd)))
            except OSError:
                continue
        try:
            with open(os.path.join(base, "maps"), encoding="utf-8", errors="replace") as f:
                lines = [ln for ln in f if (m := MAPS_DEVICE.match(ln)) and int(m.group(1), 16)]
        except OSError:
            lines = []
        write(os.path.join(proc, pid, "maps"), "".join(lines).encode())
    link(os.path.join(proc, "self"), str(os.getpid()))
    swaps = read_small_text("/proc/swaps")
    if swaps is not None:
        write(os.path.join(proc, "swaps"), swaps)


def record_debug(dest: str) -> None:
    base = "/sys/kernel/debug/bdi"
    for name in sorted(os.listdir(base)):
        data = read_small_text(os.path.join(base, name, "stats"))
        if data is not None:
            write(os.path.join(dest, "debug", "bdi", name, "stats"), data)


def record_dev(dest: str) -> None:
    """Device nodes cannot live in a git tree: list them instead, one per line,
    as TYPE MAJOR:MINOR PATH (TYPE b or c), for tests that map a node to a device."""
    lines = []
    for dirpath, _dirnames, filenames in os.walk("/dev"):
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            kind = "b" if stat.S_ISBLK(st.st_mode) else "c" if stat.S_ISCHR(st.st_mode) else ""
            if kind:
                lines.append(f"{kind} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} {full}\n")
    write(os.path.join(dest, "dev-nodes.txt"), "".join(sorted(lines)).encode())


def main() -> int:
    dest = sys.argv[1]
    os.makedirs(dest, exist_ok=True)
    record_proc(dest)  # first, before this process's own reading shows up more
    record_sys(dest)
    record_debug(dest)
    record_dev(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
