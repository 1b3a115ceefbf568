"""Read the system once, for one target, into a frozen Snapshot."""

from __future__ import annotations

import errno
import os
import stat
import threading
from typing import TYPE_CHECKING

from safeusb.host import recording, sysfs
from safeusb.host.bpfscan import namespaces_of
from safeusb.host.bpfscan import scan as scan_processes
from safeusb.host.model import (
    BlockDevice,
    DevNum,
    DirtyStat,
    MountNamespace,
    Node,
    NodeKind,
    Snapshot,
    SwapEntry,
    Target,
    Unreadable,
    fmt_devnum,
)
from safeusb.host.parsers import ParseError, parse_bdi_stats
from safeusb.host.procfs import (
    ProcessScan,
    SharedScan,
    list_pids,
    read_mount_namespaces,
    read_swaps,
    start_scan,
)
from safeusb.host.roots import Roots
from safeusb.host.usb_classes import read_classes

if TYPE_CHECKING:
    from safeusb.host.netinfo import NetMatch


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


class _Names:
    """Resolves paths such as /dev/sda1, /dev/mapper/x or /dev/vg/lv to block devices."""

    def __init__(self, roots: Roots, blocks: dict[str, BlockDevice]) -> None:
        self.roots = roots
        self.by_path: dict[str, DevNum] = {}
        self._seen: dict[str, DevNum | None] = {}
        for b in blocks.values():
            self.by_path["/dev/" + b.name] = b.devnum
            if b.dm_name:
                self.by_path["/dev/mapper/" + b.dm_name] = b.devnum
                if (b.dm_uuid or "").startswith("LVM-"):
                    vg, lv = sysfs.split_lvm_name(b.dm_name)
                    if vg and lv:
                        self.by_path[f"/dev/{vg}/{lv}"] = b.devnum

    def resolve(self, path: str) -> DevNum | None:
        if path not in self._seen:  # mount tables of many namespaces name the same ones
            self._seen[path] = self._resolve(path)
        return self._seen[path]

    def _resolve(self, path: str) -> DevNum | None:
        if not path.startswith("/dev/"):
            return None
        found = self.by_path.get(os.path.normpath(path))
        if found is not None:
            return found
        if not self.roots.live:
            node = recording.node(self.roots, path)
            return node[1] if node and node[0] == "block" else None
        try:
            st = os.stat(self.roots.dev_path(path))
        except OSError:
            return None
        if stat.S_ISBLK(st.st_mode):
            return os.major(st.st_rdev), os.minor(st.st_rdev)
        return None


def _read_all_blocks(roots: Roots) -> dict[str, BlockDevice]:
    blocks = {}
    for name in sysfs.all_block_names(roots):
        dev = sysfs.read_block_device(roots, name)
        if dev is not None:
            blocks[name] = dev
    return blocks


def _closure(start: set[str], blocks: dict[str, BlockDevice]) -> set[str]:
    """The start devices with their partitions and holders, recursively."""
    todo = list(start)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in blocks:
            continue
        seen.add(name)
        todo.extend(blocks[name].holders)
        todo.extend(b.name for b in blocks.values() if b.parent == name)
    return seen


def _fs_devices(
    namespaces: tuple[MountNamespace, ...], blocks: dict[DevNum, str], names: _Names
) -> dict[DevNum, str]:
    """Filesystems (by st_dev) that live on the given block devices, and on which one.

    Most filesystems report the block device's own number; btrfs and others report an
    anonymous one, matched through the mount source."""
    fs = dict(blocks)
    for ns in namespaces:
        for m in ns.mounts:
            if m.devnum in fs:
                continue
            src = names.resolve(m.source)
            if src is not None and src in blocks:
                fs[m.devnum] = blocks[src]
    return fs


def _mounts_of(namespaces: tuple[MountNamespace, ...], fs: set[DevNum]
               ) -> list[tuple[str, DevNum]]:
    return [(m.mountpoint, m.devnum) for ns in namespaces for m in ns.mounts if m.devnum in fs]


def _fs_of(roots: Roots, path: str, fs: set[DevNum], mounts: list[tuple[str, DevNum]]
           ) -> DevNum | None:
    """Which of the filesystems a file named by the host path lies on, if any: its st_dev
    on the live system; in a recording (or when stat fails), the longest mountpoint."""
    if roots.live:
        try:
            st = os.stat(path)
        except OSError:
            pass
        else:
            dev = (os.major(st.st_dev), os.minor(st.st_dev))
            return dev if dev in fs else None
    best = max((mp for mp in mounts if _under(path, mp[0])), key=lambda mp: len(mp[0]),
               default=None)
    return best[1] if best else None


def _bdi_of(block: BlockDevice, blocks: dict[str, BlockDevice]) -> DevNum:
    if block.bdi is not None:
        return block.bdi
    if block.parent and block.parent in blocks:
        parent = blocks[block.parent]
        return parent.bdi or parent.devnum
    return block.devnum


def _read_dirty(roots: Roots, bdis: list[DevNum]) -> tuple[DirtyStat, ...]:
    base = os.path.join(roots.debugfs, "bdi")
    out = []
    for num in bdis:
        path = os.path.join(base, fmt_devnum(num), "stats")
        try:
            with open(path, encoding="utf-8") as f:
                dirty, writeback = parse_bdi_stats(f.read())
        except FileNotFoundError:
            why = "debugfs is not mounted" if not os.path.isdir(base) else f"{path} is missing"
            out.append(DirtyStat(num, None, None, why))
        except PermissionError:
            out.append(DirtyStat(num, None, None, f"{path}: permission denied (run as root)"))
        except (OSError, ParseError) as exc:
            out.append(DirtyStat(num, None, None, f"{path}: {exc}"))
        else:
            out.append(DirtyStat(num, dirty, writeback))
    return tuple(out)


def _probe_exclusive(roots: Roots, names: list[str]) -> tuple[str, ...]:
    """Block devices that some holder has claimed exclusively (an O_EXCL open fails)."""
    if not roots.live:
        return ()
    busy = []
    for name in names:
        try:
            fd = os.open(
                roots.dev_path("/dev/" + name),
                os.O_RDONLY | os.O_EXCL | os.O_NONBLOCK | os.O_CLOEXEC,
            )
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                busy.append(name)
            continue
        os.close(fd)
    return tuple(busy)


def _node_keys(nodes: tuple[Node, ...], members: set[str],
               blocks: dict[str, BlockDevice]) -> frozenset[tuple[NodeKind, DevNum]]:
    keys: set[tuple[NodeKind, DevNum]] = {(n.kind, n.devnum) for n in nodes}
    keys |= {("block", blocks[n].devnum) for n in members}
    return frozenset(keys)


class _Ahead:
    """The process scan, begun before the mount tables are read for the nodes and
    filesystems the device has without them: in a thread where the in-kernel scan runs
    (the kernel walks while this thread parses), else shared with a forked child
    (procfs.SharedScan: it reads /proc while this process parses)."""

    def __init__(self, nodes: frozenset[tuple[NodeKind, DevNum]],
                 fs: frozenset[DevNum]) -> None:
        self.nodes, self.fs = nodes, fs
        self.found: ProcessScan | None = None
        self.error: Exception | None = None
        self.thread: threading.Thread | None = None
        self.shared: SharedScan | None = None

    @classmethod
    def start(cls, roots: Roots, pids: list[int], nodes: frozenset[tuple[NodeKind, DevNum]],
              fs: frozenset[DevNum], skip: frozenset[int], kernel: bool) -> _Ahead | None:
        """Started in a thread where the in-kernel scan runs (``kernel``: it listed the
        mount namespaces), else where a child can share the /proc scan; else None (a /proc
        scan gains nothing in a thread: it holds the interpreter)."""
        ahead = cls(nodes, fs)
        if not kernel:
            shared = start_scan(roots, pids, nodes, fs, skip)
            if not shared.child:
                return None
            ahead.shared = shared
            return ahead

        def run() -> None:
            try:
                ahead.found = scan_processes(roots, pids, nodes, fs, skip)[0]
            except Exception as exc:  # raised again in the reader's thread
                ahead.error = exc

        ahead.thread = threading.Thread(target=run, name="safeusb-scan", daemon=True)
        ahead.thread.start()
        return ahead

    def result(self, nodes: frozenset[tuple[NodeKind, DevNum]],
               fs: frozenset[DevNum]) -> ProcessScan | None:
        """The scan's findings when it was asked about these nodes and filesystems, else
        None (scan again)."""
        same = (nodes, fs) == (self.nodes, self.fs)
        if self.shared is not None:
            if same:
                return self.shared.result()
            self.shared.discard()
            return None
        assert self.thread is not None
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.found if same else None

    def close(self) -> None:
        """The findings are not wanted (the read failed): the child is waited for."""
        if self.shared is not None:
            self.shared.discard()


def keep_device(roots: Roots, target: Target
                ) -> tuple[tuple[sysfs.DeviceDirs, dict[str, BlockDevice]], bool]:
    """The device's walk and every block device, as kept in ``roots`` while no uevent
    comes (read now if they were not); and whether both were kept. safeusbd reads them
    ahead of any request once the uevents settle, so that a decision finds them."""
    walked, walk_kept = roots.read_quietly(("walk", target.syspath),
                                           lambda: sysfs.walk_device(target.syspath))
    blocks, blocks_kept = roots.read_quietly(("blocks",), lambda: _read_all_blocks(roots))
    return (walked, blocks), walk_kept and blocks_kept


def _device(roots: Roots, target: Target, kept: bool
            ) -> tuple[sysfs.DeviceDirs, dict[str, BlockDevice], set[str], tuple[str, ...]]:
    """The device's walk, every block device, the device's own (with partitions and
    holders) and which of those are claimed exclusively. The walk and the block devices
    are kept between reads while no uevent comes (keep_device); a claimed device is
    read afresh (a holder's link, a loop device's setup can change without a uevent)."""
    if kept:
        (walked, all_blocks), was_kept = keep_device(roots, target)
    else:
        walked, all_blocks = sysfs.walk_device(target.syspath), _read_all_blocks(roots)
        was_kept = False
    start = {os.path.basename(n.devname) for n in walked.nodes if n.kind == "block"}
    if target.block:
        start.add(target.block)
    members = _closure(start, all_blocks)
    exclusive = _probe_exclusive(roots, sorted(members))
    if exclusive and was_kept:
        return _device(roots, target, kept=False)
    return walked, all_blocks, members, exclusive


def read_snapshot(
    roots: Roots, target: Target, net_match: NetMatch | None = None,
    skip_pids: frozenset[int] = frozenset(), kernel_scan: bool = True,
) -> Snapshot:
    """Read everything the host does with the target, once; nothing is changed (a caller
    that wants the dirty-page figures mounts debugfs first: Runner.ensure_debugfs).
    ``net_match`` replaces the device-to-network-interface mapping (tests). This process,
    and ``skip_pids`` (the command that asked safeusbd), are not counted as users. Open
    files, mappings and mount namespaces are found by BPF iterators where they can run
    (bpfscan.py), else through /proc; ``kernel_scan=False`` reads /proc only."""
    walked, all_blocks, members, exclusive = _device(roots, target, kept=True)
    nodes = walked.nodes
    names = _Names(roots, all_blocks)
    # Every filesystem on a block device claims it exclusively, as dm, md, swap
    # and btrfs do, and a directory, a file or a mapping is on the device only through a
    # filesystem on it. Where none of its block devices is claimed, only its nodes can be
    # in use: the process scan looks for those alone, and stats nothing on other
    # filesystems (overlayfs and btrfs files, whose st_dev the kernel's walk cannot tell).
    unclaimed = roots.live and not exclusive

    ns_of = namespaces_of(roots) if kernel_scan else None
    # The kernel's walk lists the processes as /proc does (the initial pid namespace's
    # thread group leaders), without reading a directory of thousands of names.
    pids = sorted(ns_of) if ns_of is not None else list_pids(roots)
    skip = frozenset({os.getpid()}) | skip_pids if roots.live else frozenset()
    # The kernel (or a forked child reading /proc) walks the processes while the mount
    # tables are read and parsed here, for the nodes and filesystems the device has
    # without them; the mounts can add filesystems (btrfs's anonymous numbers, loop
    # devices backed on it), and then the walk runs again with them.
    ahead = _Ahead.start(roots, pids, _node_keys(nodes, members, all_blocks),
                         frozenset() if unclaimed
                         else frozenset(all_blocks[n].devnum for n in members), skip,
                         ns_of is not None)
    try:
        ns_scan = read_mount_namespaces(roots, pids, ns_of)
        namespaces = ns_scan.namespaces
        problems: list[Unreadable] = list(ns_scan.unreadable)

        # Loop devices backed by files on these filesystems hold them too: grow to a fixed point.
        loop_fs: dict[str, DevNum] = {}
        while True:
            fs_devices = _fs_devices(
                namespaces, {all_blocks[n].devnum: n for n in members}, names
            )
            fs = set(fs_devices)
            mounts = _mounts_of(namespaces, fs)
            extra = {}
            for b in all_blocks.values():
                if b.loop_backing_file and b.name not in members:
                    on = _fs_of(roots, b.loop_backing_file, fs, mounts)
                    if on is not None:
                        extra[b.name] = on
            if not extra:
                break
            loop_fs.update(extra)
            members = _closure(members | set(extra), all_blocks)

        if mounts:  # mounted since the probe: its filesystems are looked for too
            unclaimed = False
        blocks = {n: all_blocks[n] for n in sorted(members)}
        try:
            swap_rows = read_swaps(roots)
        except (OSError, ParseError) as exc:
            swap_rows = ()
            problems.append(Unreadable("active swap (/proc/swaps)", str(exc)))
        swaps = []
        for filename, kind, size, used in swap_rows:
            devnum: DevNum | None = None
            if kind == "partition":
                devnum = names.resolve(filename)
            else:
                devnum = _fs_of(roots, filename, fs, mounts)
            swaps.append(SwapEntry(filename, kind, size, used, devnum))

        # What does not wait for the processes is read while the scan ahead runs.
        bdis = sorted({_bdi_of(b, all_blocks) for b in blocks.values()})
        dirty = _read_dirty(roots, bdis)
        if loop_fs:  # grown by loop devices backed on it: probed again
            exclusive = _probe_exclusive(roots, list(blocks))
        classes = read_classes(roots, target, pids, namespaces, net_match, walked.net)
        slack = sysfs.writeback_counter_slack(roots)

        node_keys = _node_keys(nodes, members, all_blocks)
        scan_fs = frozenset() if unclaimed else frozenset(fs)
        proc_scan = ahead.result(node_keys, scan_fs) if ahead else None
        if proc_scan is None:
            proc_scan, _why = scan_processes(roots, pids, node_keys, scan_fs, skip,
                                             kernel=kernel_scan)
    except BaseException:
        if ahead:
            ahead.close()
        raise
    problems.extend(proc_scan.unreadable)
    return Snapshot(
        target=target,
        nodes=nodes,
        blocks=blocks,
        namespaces=namespaces,
        swaps=tuple(swaps),
        uses=proc_scan.uses,
        dirty=dirty,
        exclusive_busy=exclusive,
        fs_devices=fs_devices,
        backed_loops=tuple(sorted(loop_fs)),
        loop_fs=loop_fs,
        unreadable=tuple(problems),
        counter_slack_bytes=slack,
        classes=classes,
    )
