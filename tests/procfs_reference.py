"""The /proc scan as it was before it was made faster (safeusb/host/procfs.py at the time):
the reference that tests/unit/test_procfs_compare.py (recorded trees) and
tests/host/test_procfs_compare_host.py (live kernel objects) hold the current scan to, field
by field, on the same host objects. Not used by safeusb itself."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from safeusb.host.model import DevNum, MountNamespace, NodeKind, ProcessUse, Unreadable, UseKind
from safeusb.host.parsers import (
    ParseError,
    parse_maps_devices,
    parse_mountinfo,
    parse_ns_link,
    parse_swaps,
)
from safeusb.host.recording import RecordedStat, Stater, is_recording
from safeusb.host.roots import Roots

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


def _read_bytes(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)




def scan_processes(
    roots: Roots,
    pids: Iterable[int],
    nodes: frozenset[tuple[NodeKind, DevNum]],
    fs_devnums: frozenset[DevNum],
    skip_pids: frozenset[int] = frozenset(),
) -> ProcessScan:
    """Find processes holding the given device nodes, or files on the given filesystems,
    through open descriptors, working directory, root directory or memory maps (which
    include the executable)."""
    scanner = _Scanner(roots, nodes, fs_devnums)
    scanner.scan([p for p in pids if p not in skip_pids])
    problems = list(scanner.problems)
    if scanner.denied:
        denied = sorted(scanner.denied)
        sample = ", ".join(str(p) for p in denied[:5])
        problems.append(
            Unreadable(
                f"open files of {len(denied)} processes (pids {sample})",
                "permission denied (run as root)",
            )
        )
    uses = sorted(scanner.uses, key=lambda u: u.pid)
    return ProcessScan(tuple(uses), tuple(problems))


class _Scanner:
    def __init__(
        self,
        roots: Roots,
        nodes: frozenset[tuple[NodeKind, DevNum]],
        fs_devnums: frozenset[DevNum],
    ) -> None:
        self.roots = roots
        self.fs = fs_devnums
        self.fs_raw = {os.makedev(*d): d for d in fs_devnums}
        self.blk_raw = {os.makedev(*d): d for k, d in nodes if k == "block"}
        self.chr_raw = {os.makedev(*d): d for k, d in nodes if k == "char"}
        # The dev field of /proc/PID/maps, as the kernel prints it ("%02x:%02x").
        self.maps_keys = [f" {d[0]:02x}:{d[1]:02x} ".encode() for d in fs_devnums]
        self.uses: list[ProcessUse] = []
        self.recorded = Stater(roots) if is_recording(roots) else None
        self.denied: list[int] = []
        self.problems: list[Unreadable] = []

    def classify(
        self, st: os.stat_result | RecordedStat
    ) -> tuple[tuple[NodeKind, DevNum] | None, DevNum | None]:
        mode = st.st_mode
        if stat.S_ISBLK(mode):
            num = self.blk_raw.get(st.st_rdev)
            if num is not None:
                return ("block", num), None
        elif stat.S_ISCHR(mode):
            num = self.chr_raw.get(st.st_rdev)
            if num is not None:
                return ("char", num), None
        return None, self.fs_raw.get(st.st_dev)

    def _stat_link(self, pid: int, link: str, dir_fd: int | None = None
                   ) -> os.stat_result | RecordedStat:
        if self.recorded is None:
            return os.stat(link, dir_fd=dir_fd)
        found = self.recorded.stat(pid, os.readlink(link, dir_fd=dir_fd))
        if found is None:
            raise FileNotFoundError(link)
        return found

    def scan(self, pids: list[int]) -> None:
        proc = self.roots.proc
        classify = self.classify
        for pid in pids:
            base = f"{proc}/{pid}"
            found: list[tuple[UseKind, str, tuple[NodeKind, DevNum] | None, DevNum | None]] = []
            # Descriptors: one stat each (following the link); the name only for matches.
            try:
                dfd = os.open(f"{base}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno == errno.EACCES:
                    self.denied.append(pid)
                elif exc.errno not in _GONE:
                    self.problems.append(Unreadable(f"open files of pid {pid}", str(exc)))
                continue
            try:
                for name in os.listdir(dfd):
                    try:
                        st = self._stat_link(pid, name, dfd)
                    except OSError:
                        continue  # closed meanwhile
                    node, fs = classify(st)
                    if node or fs:
                        try:
                            target = os.readlink(name, dir_fd=dfd)
                        except OSError:
                            continue
                        found.append(("fd", target, node, fs))
            except OSError as exc:
                if exc.errno not in _GONE:
                    self.problems.append(Unreadable(f"open files of pid {pid}", str(exc)))
                continue
            finally:
                os.close(dfd)
            for how in ("cwd", "root"):
                link = f"{base}/{how}"
                try:
                    st = self._stat_link(pid, link)
                except OSError:
                    continue  # kernel threads and zombies have none
                if st.st_dev in self.fs_raw:
                    try:
                        path = os.readlink(link)
                    except OSError:
                        path = "?"
                    found.append((how, path, None, self.fs_raw[st.st_dev]))
            if self.maps_keys:
                data = _read_bytes(f"{base}/maps")
                if data and any(key in data for key in self.maps_keys):
                    for dev, path in parse_maps_devices(data.decode("utf-8", "replace")).items():
                        if dev in self.fs:
                            found.append(("mmap", path, None, dev))
            if found:
                comm = read_comm(self.roots, pid)
                for how, path, node, fs in found:
                    self.uses.append(ProcessUse(pid, comm, how, path, node, fs))
