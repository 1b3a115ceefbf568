"""Reading procfs: mount namespaces, swaps and what processes hold open."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from .model import DevNum, MountNamespace, NodeKind, ProcessUse, Unreadable
from .parsers import ParseError, parse_maps_devices, parse_mountinfo, parse_ns_link, parse_swaps
from .roots import Roots

_GONE = (errno.ENOENT, errno.ESRCH)


def list_pids(roots: Roots) -> list[int]:
    return sorted(int(n) for n in os.listdir(roots.proc) if n.isdigit())


def read_comm(roots: Roots, pid: int) -> str:
    try:
        with open(roots.proc_path(str(pid), "comm"), encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


@dataclass(frozen=True)
class NamespaceScan:
    namespaces: tuple[MountNamespace, ...]
    unreadable: tuple[Unreadable, ...]


def read_mount_namespaces(roots: Roots, pids: Iterable[int]) -> NamespaceScan:
    """Every mount namespace that has a process, with its mount table, read once each."""
    members: dict[int, list[int]] = {}
    problems: list[Unreadable] = []
    denied: list[int] = []
    for pid in pids:
        try:
            link = os.readlink(roots.proc_path(str(pid), "ns", "mnt"))
        except OSError as exc:
            if exc.errno in _GONE:
                continue
            if exc.errno == errno.EACCES:
                denied.append(pid)
                continue
            problems.append(Unreadable(f"mount namespace of pid {pid}", str(exc)))
            continue
        try:
            members.setdefault(parse_ns_link(link), []).append(pid)
        except ParseError as exc:
            problems.append(Unreadable(f"mount namespace of pid {pid}", str(exc)))
    namespaces = []
    for inode, pids_in in sorted(members.items()):
        for pid in pids_in:
            path = roots.proc_path(str(pid), "mountinfo")
            try:
                with open(path, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                problems.append(Unreadable(f"mounts of namespace {inode} ({path})", str(exc)))
                break
            try:
                mounts = parse_mountinfo(text)
            except ParseError as exc:
                problems.append(Unreadable(f"mounts of namespace {inode} ({path})", str(exc)))
                break
            namespaces.append(MountNamespace(inode, pid, read_comm(roots, pid), mounts))
            break
    # Where the namespace link is denied (a process of another security domain), its mount
    # table may still be readable: mount ids are unique across namespaces, so a table whose
    # ids are already known belongs to a namespace already read.
    known_ids = {m.mount_id for ns in namespaces for m in ns.mounts}
    unreadable_pids = []
    for pid in denied:
        try:
            with open(roots.proc_path(str(pid), "mountinfo"), encoding="utf-8",
                      errors="surrogateescape") as f:
                mounts = parse_mountinfo(f.read())
        except OSError as exc:
            if exc.errno not in _GONE:
                unreadable_pids.append(pid)
            continue
        except ParseError:
            unreadable_pids.append(pid)
            continue
        if mounts and mounts[0].mount_id not in known_ids:
            namespaces.append(MountNamespace(0, pid, read_comm(roots, pid), mounts))
            known_ids.update(m.mount_id for m in mounts)
    if unreadable_pids:
        sample = ", ".join(str(p) for p in unreadable_pids[:5])
        problems.append(
            Unreadable(f"the mount namespace of pids {sample}", "permission denied (run as root)")
        )
    # A namespace kept alive by a bind mount of its nsfs file has no process to read it from.
    known = {ns.inode for ns in namespaces} | set(members)
    for ns in namespaces:
        for m in ns.mounts:
            if m.fstype == "nsfs" and m.root.startswith("mnt:["):
                try:
                    inode = parse_ns_link(m.root)
                except ParseError:
                    continue
                if inode not in known:
                    known.add(inode)
                    problems.append(
                        Unreadable(
                            f"mount namespace {inode} (pinned at {m.mountpoint}, no process)",
                            "its mounts cannot be read",
                        )
                    )
    return NamespaceScan(tuple(namespaces), tuple(problems))


def read_swaps(roots: Roots) -> tuple[tuple[str, str, int, int], ...]:
    with open(roots.proc_path("swaps"), encoding="utf-8", errors="surrogateescape") as f:
        return parse_swaps(f.read())


@dataclass(frozen=True)
class ProcessScan:
    uses: tuple[ProcessUse, ...]
    unreadable: tuple[Unreadable, ...]


_PSEUDO = ("socket:", "pipe:", "anon_inode:", "/memfd:", "mnt:", "net:")


def scan_processes(
    roots: Roots,
    pids: Iterable[int],
    nodes: frozenset[tuple[NodeKind, DevNum]],
    fs_devnums: frozenset[DevNum],
    skip_pids: frozenset[int] = frozenset(),
) -> ProcessScan:
    """Find processes holding the given device nodes, or files on the given filesystems,
    through open descriptors, working directory, root, executable or memory maps."""
    uses: list[ProcessUse] = []
    denied: list[int] = []
    problems: list[Unreadable] = []
    want_nodes = bool(nodes)
    comms: dict[int, str] = {}

    def comm(pid: int) -> str:
        if pid not in comms:
            comms[pid] = read_comm(roots, pid)
        return comms[pid]

    def classify(st: os.stat_result) -> tuple[tuple[NodeKind, DevNum] | None, DevNum | None]:
        mode = st.st_mode
        if want_nodes and (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
            kind: NodeKind = "block" if stat.S_ISBLK(mode) else "char"
            key = (kind, (os.major(st.st_rdev), os.minor(st.st_rdev)))
            if key in nodes:
                return key, None
        dev = (os.major(st.st_dev), os.minor(st.st_dev))
        if dev in fs_devnums:
            return None, dev
        return None, None

    for pid in pids:
        if pid in skip_pids:
            continue
        base = roots.proc_path(str(pid))
        # Descriptors: readlink first, so sockets and pipes cost no stat.
        try:
            dfd = os.open(os.path.join(base, "fd"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EACCES:
                denied.append(pid)
            elif exc.errno not in _GONE:
                problems.append(Unreadable(f"open files of pid {pid}", str(exc)))
            continue
        try:
            for name in os.listdir(dfd):
                try:
                    target = os.readlink(name, dir_fd=dfd)
                    if target.startswith(_PSEUDO):
                        continue
                    st = os.stat(name, dir_fd=dfd)
                except OSError:
                    continue  # closed meanwhile
                node, fs = classify(st)
                if node or fs:
                    uses.append(ProcessUse(pid, comm(pid), "fd", target, node, fs))
        except OSError as exc:
            if exc.errno not in _GONE:
                problems.append(Unreadable(f"open files of pid {pid}", str(exc)))
            continue
        finally:
            os.close(dfd)
        for how in ("cwd", "root", "exe"):
            link = os.path.join(base, how)
            try:
                st = os.stat(link)
            except OSError:
                continue  # kernel threads and zombies have none
            node, fs = classify(st)
            if fs:
                try:
                    path = os.readlink(link)
                except OSError:
                    path = "?"
                uses.append(ProcessUse(pid, comm(pid), how, path, None, fs))
        if fs_devnums:
            try:
                with open(os.path.join(base, "maps"), encoding="utf-8", errors="replace") as f:
                    mapped = parse_maps_devices(f.read())
            except OSError:
                continue
            for dev, path in mapped.items():
                if dev in fs_devnums:
                    uses.append(ProcessUse(pid, comm(pid), "mmap", path, None, dev))
    if denied:
        sample = ", ".join(str(p) for p in denied[:5])
        problems.append(
            Unreadable(
                f"open files of {len(denied)} processes (pids {sample}...)",
                "permission denied (run as root)",
            )
        )
    return ProcessScan(tuple(uses), tuple(problems))
