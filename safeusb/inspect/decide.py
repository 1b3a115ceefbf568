"""Decide, from a Snapshot, everything that keeps a device from being handed over.

Pure functions: no system access here.
"""

from __future__ import annotations

from safeusb.host.model import BlockDevice, DevNum, Snapshot, fmt_devnum, node
from safeusb.host.usb_classes import class_reasons, class_warnings, node_label
from safeusb.reasons import (
    CannotRead,
    Dirty,
    Exclusive,
    Holder,
    LoopHolder,
    Mount,
    Open,
    Reason,
    Submount,
    Swap,
    Use,
)
from safeusb.textout import human_bytes
from safeusb.values import frozen


@frozen
class Findings:
    snapshot: Snapshot
    reasons: tuple[Reason, ...]
    notes: tuple[str, ...] = ()
    warnings: tuple[Reason, ...] = ()  # never keep it from being free: mode-switch

    @property
    def free(self) -> bool:
        return not self.reasons


_HOW = {
    "fd": "open",
    "cwd": "working directory",
    "root": "root directory",
    "exe": "running",
    "mmap": "mapped",
}


def _ns_text(inode: int, pid: int) -> str:
    return f"mount namespace {inode}" if inode else f"the mount namespace of pid {pid}"


def _holder_text(holder: BlockDevice, below: BlockDevice) -> str:
    kind = {
        "dm-crypt": "dm-crypt mapping",
        "lvm": "LVM logical volume",
        "dm": "device-mapper device",
        "md": "md RAID array",
        "bcache": "bcache device",
    }.get(holder.kind, "device")
    return f"{kind} {node(holder.label())} is built on {node(below.name)}"


def inspect(snap: Snapshot) -> Findings:
    reasons: list[Reason] = []
    blocks = snap.blocks
    by_devnum: dict[DevNum, BlockDevice] = {b.devnum: b for b in blocks.values()}
    mounted: set[str] = set()

    def owner(num: DevNum) -> BlockDevice | None:
        name = snap.fs_devices.get(num)
        return blocks.get(name) if name else None

    # Mounts, in every mount namespace.
    for ns in snap.namespaces:
        for m in ns.mounts:
            dev = owner(m.devnum)
            if dev is None:
                continue
            name = dev.name
            mounted.add(name)
            reasons.append(
                Reason(
                    f"{node(name)} mounted at {m.mountpoint} in {_ns_text(ns.inode, ns.pid)} "
                    f"(pid {ns.pid} {ns.comm})",
                    Mount(name, m.mountpoint, m.fstype, m.options, ns.inode, ns.pid, ns.comm),
                )
            )

    # Foreign mounts stacked on one of its filesystems pin it: unmounting it would fail,
    # and unmounting them is not safeusb's to decide (a tmpfs there holds data of its own).
    for ns in snap.namespaces:
        ours = {m.mount_id: m for m in ns.mounts if owner(m.devnum) is not None}
        if not ours:
            continue
        for m in ns.mounts:
            below = ours.get(m.parent_id)
            if below is None or m.mount_id in ours:
                continue
            dev = owner(below.devnum)
            reasons.append(
                Reason(
                    f"{m.fstype} {m.source} is mounted at {m.mountpoint}, on top of "
                    f"{node(dev.name if dev else '?')} (mounted at {below.mountpoint}) in "
                    f"{_ns_text(ns.inode, ns.pid)}; unmount it first",
                    Submount(m.mountpoint, m.fstype, m.source, below.mountpoint, ns.inode,
                             ns.pid),
                )
            )

    # Swap.
    for s in snap.swaps:
        if s.devnum is None:
            continue
        if s.swap_type == "partition" and s.devnum in by_devnum:
            dev = by_devnum[s.devnum]
            mounted.add(dev.name)
            text = f"{node(dev.name)} is active swap ({human_bytes(s.used_kib * 1024)} in use)"
        elif s.swap_type != "partition" and s.devnum in snap.fs_devices:
            text = f"swap file {s.filename} is active on this device"
        else:
            continue
        reasons.append(Reason(text, Swap(s.filename, s.used_kib * 1024)))

    # Holders: dm-crypt, LVM, md, bcache, loop devices backed by files on it.
    for b in blocks.values():
        for h in b.holders:
            holder = blocks.get(h)
            if holder is None:
                continue
            mounted.add(b.name)
            reasons.append(
                Reason(
                    _holder_text(holder, b),
                    Holder(b.name, holder.name, holder.kind, holder.dm_name),
                )
            )
    for name in snap.backed_loops:
        loop = blocks[name]
        reasons.append(
            Reason(
                f"loop device {node(name)} is backed by {loop.loop_backing_file} on this device",
                LoopHolder(name, loop.loop_backing_file),
            )
        )

    # Processes: one line per process and thing it holds.
    node_paths = {(n.kind, n.devnum): n.path for n in snap.nodes}
    labels = {n.path: node_label(n) for n in snap.nodes}
    for b in blocks.values():
        node_paths.setdefault(("block", b.devnum), b.path)
    held: dict[tuple[int, str], list[tuple[str, str]]] = {}
    comms: dict[int, str] = {}
    for u in snap.uses:
        comms[u.pid] = u.comm
        if u.node is not None:
            what = node_paths.get(u.node, u.path)
            held.setdefault((u.pid, what), [])
        else:
            assert u.fs is not None
            dev = owner(u.fs)
            on = node(dev.name) if dev else f"filesystem {fmt_devnum(u.fs)}"
            entry = (u.how, u.path)
            uses = held.setdefault((u.pid, on), [])
            if entry not in uses:
                uses.append(entry)
    for (pid, what), uses in held.items():
        if not uses:
            text = f"pid {pid} ({comms[pid]}) has {labels.get(what, what)} open"
        else:
            shown = ", ".join(f"{_HOW[how]} {path}" for how, path in uses[:3])
            more = f" and {len(uses) - 3} more" if len(uses) > 3 else ""
            text = f"pid {pid} ({comms[pid]}) uses {what}: {shown}{more}"
        reasons.append(
            Reason(text, Open(pid, comms[pid], what, tuple(Use(h, p) for h, p in uses)))
        )

    # Exclusive claims that nothing above explains.
    explained = set(mounted)
    for b in blocks.values():
        if b.parent in mounted or b.name in mounted:
            explained.add(b.name)
    for name in mounted:
        parent = blocks[name].parent if name in blocks else None
        if parent:
            explained.add(parent)
    for name in snap.exclusive_busy:
        if name not in explained:
            reasons.append(
                Reason(
                    f"{node(name)} is claimed exclusively by a holder safeusb cannot name",
                    Exclusive(name),
                )
            )

    # Dirty and under-writeback data. A block device nobody has open holds none: its last
    # close wrote its page cache back. Small figures on such a device are counter drift.
    notes: list[str] = []
    unopened = not reasons and not snap.unreadable
    bdi_names = {b.devnum: b.name for b in blocks.values() if b.devtype == "disk"}
    for d in snap.dirty:
        name = bdi_names.get(d.bdi, fmt_devnum(d.bdi))
        if d.dirty_bytes is None or d.writeback_bytes is None:
            reasons.append(
                Reason(
                    f"dirty data on {name} cannot be read ({d.error}); it may hold unwritten data",
                    CannotRead(f"dirty data on {name}", d.error),
                )
            )
        elif (
            unopened
            and d.dirty_bytes <= snap.counter_slack_bytes
            and d.writeback_bytes <= snap.counter_slack_bytes
        ):
            if d.dirty_bytes or d.writeback_bytes:
                notes.append(
                    f"{human_bytes(d.dirty_bytes)} dirty, {human_bytes(d.writeback_bytes)} under "
                    f"writeback shown on {name}, which nobody has open: within the kernel's "
                    f"per-CPU counter error ({human_bytes(snap.counter_slack_bytes)}), ignored"
                )
        elif d.dirty_bytes or d.writeback_bytes:
            reasons.append(
                Reason(
                    f"{human_bytes(d.dirty_bytes)} dirty, {human_bytes(d.writeback_bytes)} "
                    f"under writeback on {name}",
                    Dirty(name, d.dirty_bytes, d.writeback_bytes),
                )
            )

    warnings: list[Reason] = []
    if snap.classes is not None:
        reasons.extend(class_reasons(snap.classes))
        warnings.extend(class_warnings(snap.classes, snap.target, snap.nodes))

    for problem in snap.unreadable:
        reasons.append(
            Reason(f"cannot read {problem.what}: {problem.error}",
                   CannotRead(problem.what, problem.error))
        )
    return Findings(snap, tuple(reasons), tuple(notes), tuple(warnings))
