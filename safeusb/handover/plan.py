"""Plans: the ordered steps (steps.py) that hand a device over safely, built by pure
functions from the findings and the policy's settings.
"""

from __future__ import annotations

from collections.abc import Sequence

from safeusb.handover.policy import Settings
from safeusb.handover.steps import (
    CloseCrypt,
    DeactivateLV,
    DetachLoop,
    DownLink,
    Flush,
    Handoff,
    Kill,
    RemoveDm,
    Step,
    StopMd,
    Swapoff,
    Unmount,
)
from safeusb.host.model import (
    BlockDevice,
    DevNum,
    LoopSetup,
    MountEntry,
    MountNamespace,
    NetInterface,
    NetNamespaceRef,
    Snapshot,
    node,
)
from safeusb.host.sysfs import split_lvm_name
from safeusb.inspect.decide import Findings
from safeusb.reasons import Mount, NetworkStacked, Open, Reason, ReasonKind, with_details
from safeusb.textout import human_bytes
from safeusb.values import frozen

STORAGE_DRIVERS = ("usb-storage", "uas")
_DELETED = " (deleted)"  # how the kernel shows the path of a file no longer linked


@frozen
class Plan:
    settings: Settings
    rule: str
    steps: tuple[Step, ...]
    refusals: tuple[str, ...]
    findings: Findings

    @property
    def refused(self) -> bool:
        return bool(self.refusals)


def _depth(path: str) -> int:
    return path.rstrip("/").count("/")


def build_plan(findings: Findings, settings: Settings, rule: str) -> Plan:
    """Decide, from what inspect found and the policy, what to do; pure."""
    snap = findings.snapshot
    refusals: list[str] = []
    by_kind: dict[ReasonKind, list[Reason]] = {}
    for r in findings.reasons:
        by_kind.setdefault(r.kind, []).append(r)

    def refuse(kind: ReasonKind, advice: str) -> None:
        for r in by_kind.get(kind, []):
            refusals.append(f"{r.text}; {advice}")

    for r in by_kind.get(ReasonKind.UNREADABLE, []):
        refusals.append(f"{r.text}; safeusb cannot tell whether the device is in use")
    refuse(ReasonKind.EXCLUSIVE, "safeusb does not know how to release it")
    for r in by_kind.get(ReasonKind.SUBMOUNT, []):
        refusals.append(r.text)
    refuse(ReasonKind.LAST_INPUT, "the policy does not allow handing it over")
    if settings.network == "refuse":
        refuse(ReasonKind.NETWORK, f"take it down or set network = \"down\" ({rule})")
    else:
        for r, _ in with_details(findings.reasons, NetworkStacked):
            refusals.append(f"{r.text}; safeusb cannot put a stacked interface back")
    if settings.mount == "refuse":
        unwritten = _unwritten(findings)
        for r, mount in with_details(findings.reasons, Mount):
            extra = unwritten.get(mount.device, "")
            refusals.append(f"{r.text}{extra}; unmount it or set mount = \"unmount\" ({rule})")
    if settings.swap == "refuse":
        refuse(ReasonKind.SWAP, f"swapoff it or set swap = \"unmount\" ({rule})")
    if settings.holder == "refuse":
        refuse(ReasonKind.HOLDER, f"take it down or set holder = \"unmount\" ({rule})")
    else:
        for loop in snap.backed_loops:
            backing = snap.blocks[loop].loop_backing_file or ""
            if backing.endswith(_DELETED):
                refusals.append(
                    f"loop device {node(loop)} is backed by {backing.removesuffix(_DELETED)}, "
                    "a file already deleted: detaching it would destroy what it holds; "
                    "copy its contents off it and detach it yourself")

    # Processes: files on its filesystems keep them from unmounting unless ended.
    kills: list[Kill] = []
    for r, held in with_details(findings.reasons, Open):
        on_fs = bool(held.uses)
        if settings.open == "refuse":
            refusals.append(f"{r.text}; close it or set open = \"force\" ({rule})")
        elif settings.kill:
            if all(k.pid != held.pid for k in kills):  # one reason per device used
                kills.append(Kill(held.pid, held.comm))
        elif on_fs:
            refusals.append(f"{r.text}; it keeps the filesystem busy: close it or set "
                            f"kill = true ({rule})")
    if refusals:
        return Plan(settings, rule, (), tuple(refusals), findings)

    steps: list[Step] = list(kills)
    steps.extend(_flush_steps(snap, findings))
    steps.extend(teardown_steps(snap))
    links = _down_links(snap) if by_kind.get(ReasonKind.NETWORK) else []
    steps.extend(links)
    steps.append(_handoff(snap, links))
    return Plan(settings, rule, tuple(steps), (), findings)


def _unwritten(findings: Findings) -> dict[str, str]:
    """" with 4.0 MiB not yet written" for each device whose disk holds dirty data."""
    snap = findings.snapshot
    dirty = {d.bdi: (d.dirty_bytes or 0) + (d.writeback_bytes or 0) for d in snap.dirty}
    out = {}
    for b in snap.blocks.values():
        disk = snap.blocks.get(b.parent) if b.parent else b
        if disk is None:
            continue
        amount = dirty.get(disk.bdi or disk.devnum, 0)
        if amount > snap.counter_slack_bytes:
            out[b.name] = f" with {human_bytes(amount)} not yet written"
    return out


def _flush_steps(snap: Snapshot, findings: Findings) -> list[Flush]:
    dirty = {d.bdi: d.dirty_bytes or 0 for d in snap.dirty}
    by_bdi: dict[DevNum, BlockDevice] = {}
    for b in snap.blocks.values():
        if b.devtype == "disk":
            by_bdi.setdefault(b.bdi or b.devnum, b)
    mounts_by_block: dict[str, list[tuple[int, str]]] = {}
    for ns, m in _our_mounts(snap):
        mounts_by_block.setdefault(snap.fs_devices[m.devnum], []).append((ns.pid, m.mountpoint))
    steps = []
    for bdi, disk in sorted(by_bdi.items()):
        members = [b for b in snap.blocks.values() if disk.name in (b.name, b.parent)]
        fss = tuple(fs for b in members for fs in mounts_by_block.get(b.name, []))
        nodes = tuple(b.path for b in members)
        steps.append(Flush(disk.name, f"{bdi[0]}:{bdi[1]}", dirty.get(bdi, 0), fss, nodes))
    return steps


def _our_mounts(snap: Snapshot) -> list[tuple[MountNamespace, MountEntry]]:
    return [(ns, m) for ns in snap.namespaces for m in ns.mounts if m.devnum in snap.fs_devices]


def teardown_steps(snap: Snapshot) -> list[Step]:
    """Everything built on the target, top first: mounts, swap, loops, dm/LVM/md."""
    blocks = snap.blocks
    mounts = _our_mounts(snap)
    swaps = {s.devnum: s for s in snap.swaps if s.devnum is not None}
    steps: list[Step] = []
    done: set[str] = set()

    def unmounts_of(name: str) -> list[Step]:
        fs_nums = {num for num, owner in snap.fs_devices.items() if owner == name}
        mine = [(ns, m) for ns, m in mounts if m.devnum in fs_nums]
        mine.sort(key=lambda nm: (nm[0].inode, -_depth(nm[1].mountpoint)))
        return [
            Unmount(name, m.source, m.mountpoint, m.fstype, _mount_options(m), ns.inode, ns.pid)
            for ns, m in mine
        ]

    def teardown(name: str) -> None:
        if name in done or name not in blocks:
            return
        done.add(name)
        dev = blocks[name]
        # Loop devices backed by files on this device's filesystems go first.
        for loop in snap.backed_loops:
            if loop not in done and _backed_on(snap, loop, name):
                teardown(loop)
                steps.append(_detach_loop(snap, blocks[loop]))
        steps.extend(unmounts_of(name))
        for num, s in swaps.items():
            if num == dev.devnum and s.swap_type == "partition":
                steps.append(Swapoff(s.filename))
            elif s.swap_type != "partition" and snap.fs_devices.get(num) == name:
                steps.insert(0, Swapoff(s.filename))  # a swap file: before its filesystem
        for holder in dev.holders:
            if holder in blocks and holder not in done:
                teardown(holder)
                steps.append(_remove_holder(blocks[holder], blocks))

    for name in sorted(blocks, key=lambda n: (blocks[n].devtype != "partition", n)):
        if blocks[name].slaves and any(s in blocks for s in blocks[name].slaves):
            continue  # holders are reached from below
        if name in snap.backed_loops:
            continue
        teardown(name)
    return steps


def _backed_on(snap: Snapshot, loop: str, name: str) -> bool:
    """The loop device's backing file lies on a filesystem of block device name."""
    fs = snap.loop_fs.get(loop)
    return fs is not None and snap.fs_devices.get(fs) == name


def _detach_loop(snap: Snapshot, loop: BlockDevice) -> DetachLoop:
    """The step, with how the loop is set up and a namespace in which its backing file's
    path (as the kernel shows it) is reached again: the first one (the host's, usually)
    where that filesystem is mounted above the file."""
    backing = loop.loop_backing_file or ""
    fs = snap.loop_fs.get(loop.name)
    where = next(
        ((ns.pid, ns.inode) for ns in snap.namespaces for m in ns.mounts
         if m.devnum == fs and backing.startswith(m.mountpoint.rstrip("/") + "/")),
        (0, 0),
    )
    setup = loop.loop or LoopSetup()
    return DetachLoop(
        node(loop.name), backing, offset=setup.offset, sizelimit=setup.sizelimit,
        read_only=setup.read_only, partscan=setup.partscan, direct_io=setup.direct_io,
        sector_size=setup.sector_size, autoclear=setup.autoclear, pid=where[0],
        mnt_ns=where[1],
    )


def _remove_holder(holder: BlockDevice, blocks: dict[str, BlockDevice]) -> Step:
    if holder.kind == "dm-crypt" and holder.dm_name:
        return CloseCrypt(holder.dm_name)
    if holder.kind == "lvm" and holder.dm_name:
        vg, lv = split_lvm_name(holder.dm_name)
        return DeactivateLV(vg, lv)
    if holder.kind == "md":
        return StopMd(holder.path, tuple(node(s) for s in holder.slaves))
    return RemoveDm(holder.dm_name or holder.name)


def _mount_options(m: MountEntry) -> str:
    """Options to mount it again: per-mount flags plus the filesystem's own."""
    seen: list[str] = []
    for opt in (m.options + "," + m.super_options).split(","):
        if opt and opt not in seen and opt not in ("rw", "ro", "seclabel"):
            seen.append(opt)
    mode = "ro" if "ro" in m.options.split(",") else "rw"
    return ",".join([mode, *seen])


def hold_targets(snap: Snapshot) -> tuple[str, ...]:
    """The nodes whose exclusive hold keeps every filesystem on the target from mounting:
    each partition, and each disk that has none (holding a partition blocks its disk)."""
    disks = [b for b in snap.blocks.values()
             if b.devtype == "disk" and not b.slaves and b.name not in snap.backed_loops]
    out = []
    for disk in disks:
        parts = [b.path for b in snap.blocks.values() if b.parent == disk.name]
        out.extend(sorted(parts) if parts else [disk.path])
    return tuple(out)


def down_link(i: NetInterface, namespaces: Sequence[NetNamespaceRef], port: str) -> DownLink:
    """The step that takes interface ``i`` down and can put it back."""
    ns = next((n for n in namespaces if n.inode == i.netns), None)
    return DownLink(
        name=i.name,
        mac=(i.link.perm_address or i.link.address or "").lower(),
        port=port,
        netns=i.netns,
        netns_path=ns.path if ns else "",
        netns_where=ns.where if ns else "",
        up=i.up,
        master=i.master,
        addresses=tuple((a.family, a.address, a.prefixlen) for a in i.addresses
                        if a.permanent and a.scope not in ("link", "host")),
        routes=tuple((r.family, r.dst, r.gateway, r.table) for r in i.routes
                     if r.configured),
        parent=i.link.parent_dev or "",
    )


def _down_links(snap: Snapshot) -> list[DownLink]:
    """Every interface of the device that the host uses, to take down (network = "down")."""
    usb = snap.target.usb
    if snap.classes is None:
        return []
    net = snap.classes.net
    out = []
    for i in net.interfaces:
        if i.lower is not None or usb is None:
            continue
        if not (i.up or i.addresses or i.routes or i.master):
            continue
        out.append(down_link(i, net.namespaces, usb.sysname))
    return out


def _handoff(snap: Snapshot, links: Sequence[DownLink] = ()) -> Handoff:
    disks = hold_targets(snap)
    usb = snap.target.usb
    interfaces: tuple[tuple[str, str], ...] = ()
    if usb is not None:
        taken = {(lk.netns, lk.name) for lk in links}
        parents = {i.link.parent_dev for i in snap.classes.net.interfaces
                   if (i.netns, i.name) in taken} if snap.classes else set()
        interfaces = tuple((i.name, i.driver) for i in usb.interfaces
                           if i.driver in STORAGE_DRIVERS
                           or (i.driver and i.name in parents))
    return Handoff(disks, interfaces)


def describe_plan(plan: Plan) -> list[str]:
    if plan.refused:
        return list(plan.refusals)
    return [f"{i}. {s.describe()}" for i, s in enumerate(plan.steps, 1)]
