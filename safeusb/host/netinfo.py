"""Network interfaces of a device, in every network namespace on the host.

An interface moved into another network namespace is not listed in this namespace's
/sys/class/net, so every namespace is entered (its processes and threads, and namespace
files bind-mounted in any mount namespace, such as /run/netns/NAME) and asked over
rtnetlink. Reading here; deciding is ``net_reasons``, a pure function.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from safeusb.host import sysfs
from safeusb.host.model import (
    LinkId,
    MountNamespace,
    NetAddress,
    NetInterface,
    NetNamespaceRef,
    NetRoute,
    NetScan,
    Unreadable,
)
from safeusb.host.parsers import ParseError, parse_ns_link
from safeusb.host.procfs import descriptor_stats, read_comm
from safeusb.host.roots import Roots
from safeusb.reasons import (
    CannotRead,
    NetworkAddress,
    NetworkEnslaved,
    NetworkRoute,
    NetworkStacked,
    NetworkUp,
    Reason,
)
from safeusb.textout import human_bytes
from safeusb.values import frozen

_CLONE_NEWNET = 0x40000000
_IFF_UP = 0x1
_IFA_F_PERMANENT = 0x80
# Link kinds whose IFLA_LINK names the interface they are stacked on (not a peer).
UPPER_KINDS = frozenset({"vlan", "macvlan", "macvtap", "ipvlan", "ipvtap", "macsec"})
_SCOPES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}


@frozen
class NetMatch:
    """Which interfaces belong to the device: injectable, so tests can name veth pairs."""

    belongs: Callable[[LinkId], bool]
    expected: int | None  # interfaces the device has in all namespaces; None: unknown


# ---------------------------------------------------------------------------------------
# Which interfaces a USB device has (sysfs)


def _under_usb(parent_dev: str, sysname: str) -> bool:
    """Whether a kernel device name ("2-1.4:1.0") lies on USB device sysname ("2-1")."""
    return parent_dev == sysname or parent_dev.startswith((sysname + ":", sysname + "."))


def device_match(syspath: str, sysname: str | None,
                 dirs: Sequence[str] | None = None) -> NetMatch:
    """Interfaces of the device at a sysfs path.

    The kernel keeps a device's network interfaces in its "net" directory; entries in
    other namespaces are hidden, but the directory's link count still counts them (each
    interface is a subdirectory). Elsewhere they are found by rtnetlink's parent device
    (IFLA_PARENT_DEV_NAME); here also by the names sysfs shows. ``dirs``: the device's
    "net" directories, when a walk of it found them already (sysfs.walk_device)."""
    if dirs is None:
        dirs = sysfs.walk_device(syspath).net
    expected = 0
    visible: dict[str, int] = {}
    for d in dirs:
        try:
            expected += os.stat(d).st_nlink - 2
            names = os.listdir(d)
        except OSError:
            return NetMatch(lambda _link: False, None)
        for name in names:
            try:
                with open(os.path.join(d, name, "ifindex"), encoding="ascii") as f:
                    visible[name] = int(f.read())
            except (OSError, ValueError):
                continue
    try:
        own = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        own = -1

    def belongs(link: LinkId) -> bool:
        if sysname and link.parent_bus == "usb" and link.parent_dev:
            if _under_usb(link.parent_dev, sysname):
                return True
        return link.netns == own and visible.get(link.name) == link.ifindex

    return NetMatch(belongs, expected)


# ---------------------------------------------------------------------------------------
# Finding every network namespace


@frozen
class _Source:
    inode: int
    path: str  # a file to open that refers to it
    where: str
    pid: int | None = None  # a process in it


def namespace_sources(
    roots: Roots, pids: Iterable[int], mounts: Iterable[MountNamespace]
) -> tuple[list[_Source], list[Unreadable]]:
    """Every network namespace that a process or thread is in, or that a namespace file
    bind-mounted in some mount namespace pins (ip netns, container runtimes)."""
    found: dict[int, _Source] = {}
    problems: list[Unreadable] = []
    denied: list[int] = []
    for pid in pids:
        base = roots.proc_path(str(pid))
        try:
            tids = os.listdir(os.path.join(base, "task"))
        except OSError:
            tids = [str(pid)]
        for tid in tids:
            path = os.path.join(base, "task", tid, "ns", "net")
            try:
                inode = parse_ns_link(os.readlink(path), "net")
            except OSError as exc:
                if exc.errno == errno.EACCES:
                    denied.append(pid)
                    break
                continue  # gone meanwhile
            except ParseError as exc:
                problems.append(Unreadable(f"network namespace of pid {pid}", str(exc)))
                continue
            if inode not in found:
                found[inode] = _Source(inode, path, f"pid {pid} ({read_comm(roots, pid)})",
                                       pid)
    for ns in mounts:
        for m in ns.mounts:
            if m.fstype != "nsfs" or not m.root.startswith("net:["):
                continue
            try:
                inode = parse_ns_link(m.root, "net")
            except ParseError:
                continue
            if inode not in found:
                path = roots.proc_path(str(ns.pid), "root") + m.mountpoint
                found[inode] = _Source(inode, path, m.mountpoint)
    denied = _unplaced(roots, denied, found.values())
    if denied:
        sample = ", ".join(str(p) for p in sorted(set(denied))[:5])
        problems.append(
            Unreadable(f"the network namespace of pids {sample}", "permission denied (run as root)")
        )
    return sorted(found.values(), key=lambda s: s.inode), problems


def _unplaced(roots: Roots, pids: list[int], known: Iterable[_Source]) -> list[int]:
    """The pids, among those whose namespace link is denied, that are in none of the known
    namespaces. Each namespace has its own /proc/net entries, so the inode of a process's
    net/dev tells its network namespace apart where the link cannot be read."""
    if not pids:
        return []
    marks = set()
    for src in known:
        if src.pid is not None:
            try:
                marks.add(os.stat(roots.proc_path(str(src.pid), "net", "dev")).st_ino)
            except OSError:
                continue
    out = []
    for pid in pids:
        try:
            mark = os.stat(roots.proc_path(str(pid), "net", "dev")).st_ino
        except FileNotFoundError:
            continue  # gone
        except OSError:
            out.append(pid)
            continue
        if mark not in marks:
            out.append(pid)
    return out


# ---------------------------------------------------------------------------------------
# Reading one namespace over rtnetlink


def _setns(fd: int) -> None:
    import ctypes  # noqa: PLC0415 (only to enter a namespace)

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def socket_in(path: str) -> Any:
    """An rtnetlink socket bound in the namespace a file refers to.

    A socket stays in the namespace it was made in; it is made by a short-lived thread
    that entered the namespace, so this process never leaves its own."""
    from pyroute2 import IPRoute  # noqa: PLC0415 (only where there is a network to read)

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    out: dict[str, Any] = {}

    def enter() -> None:
        try:
            _setns(fd)
            out["ipr"] = IPRoute()
        except Exception as exc:
            out["error"] = exc

    try:
        thread = threading.Thread(target=enter, name="safeusb-netns")
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if "error" in out:
        raise out["error"]
    return out["ipr"]


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _kind(msg: Any) -> str | None:
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return str(kind) if kind else None


def link_id(netns: int, msg: Any) -> LinkId:
    return LinkId(
        netns=netns,
        ifindex=int(msg["index"]),
        name=str(_attr(msg, "IFLA_IFNAME")),
        parent_dev=_attr(msg, "IFLA_PARENT_DEV_NAME"),
        parent_bus=_attr(msg, "IFLA_PARENT_DEV_BUS_NAME"),
        address=_attr(msg, "IFLA_ADDRESS"),
        perm_address=_attr(msg, "IFLA_PERM_ADDRESS"),
    )


def addresses_from(msgs: Iterable[Any], ifindex: int) -> tuple[NetAddress, ...]:
    import socket  # noqa: PLC0415 (only where there is a network to read)

    out = []
    for a in msgs:
        if a["index"] != ifindex:
            continue
        addr = _attr(a, "IFA_LOCAL") or _attr(a, "IFA_ADDRESS")
        if addr is None:
            continue
        family = 6 if a["family"] == socket.AF_INET6 else 4
        flags = _attr(a, "IFA_FLAGS")
        flags = int(a["flags"]) if flags is None else int(flags)
        out.append(NetAddress(family, str(addr), int(a["prefixlen"]),
                              _SCOPES.get(int(a["scope"]), str(a["scope"])),
                              bool(flags & _IFA_F_PERMANENT)))
    return tuple(out)


def routes_from(msgs: Iterable[Any], ifindex: int) -> tuple[NetRoute, ...]:
    """Routes that leave through the interface (directly or as one path of several),
    default routes first; the kernel's local table is left out."""
    import socket  # noqa: PLC0415 (only where there is a network to read)

    out = []
    for r in msgs:
        table = _attr(r, "RTA_TABLE") or r["table"]
        if table == 255 or r["type"] != 1:  # local table; only unicast routes
            continue
        hops = [(_attr(r, "RTA_OIF"), _attr(r, "RTA_GATEWAY"))]
        for nh in _attr(r, "RTA_MULTIPATH") or ():
            hops.append((nh["oif"], nh.get_attr("RTA_GATEWAY")))
        family = 6 if r["family"] == socket.AF_INET6 else 4
        dst = _attr(r, "RTA_DST")
        dst_text = "default" if not r["dst_len"] else f"{dst}/{r['dst_len']}"
        for oif, gateway in hops:
            if oif == ifindex:
                out.append(NetRoute(family, dst_text, gateway, int(table), int(r["proto"])))
    return tuple(sorted(out, key=lambda rt: (not rt.is_default, rt.family)))


@dataclass
class _NsRead:
    source: _Source
    links: list[Any] = field(default_factory=list)
    ipr: Any = None


def _interface(
    ns: _NsRead, msg: Any, by_index: dict[int, Any], addrs: list[Any], routes: list[Any],
    *, lower: str | None = None, lower_netns: int | None = None,
) -> NetInterface:
    link = link_id(ns.source.inode, msg)
    master_msg = by_index.get(_attr(msg, "IFLA_MASTER") or -1)
    stats = _attr(msg, "IFLA_STATS64")
    uppers = tuple(
        str(_attr(m, "IFLA_IFNAME"))
        for m in ns.links
        if _kind(m) in UPPER_KINDS
        and _attr(m, "IFLA_LINK") == link.ifindex
        and _attr(m, "IFLA_LINK_NETNSID") is None
    )
    return NetInterface(
        link=link,
        kind=_kind(msg),
        up=bool(msg["flags"] & _IFF_UP),
        operstate=str(_attr(msg, "IFLA_OPERSTATE") or "UNKNOWN"),
        master=str(_attr(master_msg, "IFLA_IFNAME")) if master_msg is not None else None,
        master_kind=_kind(master_msg) if master_msg is not None else None,
        lower=lower,
        lower_netns=lower_netns,
        uppers=uppers,
        addresses=addresses_from(addrs, link.ifindex),
        routes=routes_from(routes, link.ifindex),
        rx_bytes=stats["rx_bytes"] if stats else None,
        tx_bytes=stats["tx_bytes"] if stats else None,
    )


def read_network(
    roots: Roots, pids: Iterable[int], mounts: Iterable[MountNamespace], match: NetMatch
) -> NetScan:
    """The device's interfaces, and those stacked on them, in every network namespace."""
    if match.expected == 0:
        return NetScan()  # the device has no network interfaces: nothing to look for
    if not roots.live:
        return NetScan(expected=match.expected, unreadable=(
            Unreadable("network namespaces", "not a live system"),))
    pids = list(pids)
    sources, problems = namespace_sources(roots, pids, mounts)
    reads: list[_NsRead] = []
    try:
        _read_all(sources, reads, problems)
        if match.expected is not None and _own_count(reads, match) < match.expected:
            # Some interface is in a namespace that neither a process nor a mount pins:
            # look for descriptors that hold one (slower: a readlink per descriptor).
            known = {r.source.inode for r in reads}
            _read_all(held_by_descriptors(roots, pids, known), reads, problems)
        return _collect(reads, match, problems)
    finally:
        for ns in reads:
            ns.ipr.close()


def _read_all(sources: Iterable[_Source], reads: list[_NsRead],
              problems: list[Unreadable]) -> None:
    for src in sources:
        try:
            ipr = socket_in(src.path)
        except FileNotFoundError:
            continue  # its last process exited meanwhile
        except OSError as exc:
            if exc.errno == errno.EINVAL and src.where.startswith("descriptor "):
                continue  # a descriptor of another kind of namespace

            problems.append(Unreadable(
                f"network namespace {src.inode} ({src.where})", exc.strerror or str(exc)))
            continue
        ns = _NsRead(src, ipr=ipr)
        reads.append(ns)
        try:
            ns.links = list(ipr.get_links())
        except Exception as exc:
            problems.append(Unreadable(f"interfaces of network namespace {src.inode}",
                                       str(exc)))


def _own_count(reads: list[_NsRead], match: NetMatch) -> int:
    return sum(1 for ns in reads for m in ns.links
               if match.belongs(link_id(ns.source.inode, m)))


def held_by_descriptors(roots: Roots, pids: Iterable[int], known: set[int]) -> list[_Source]:
    """Namespaces that an open descriptor of some process refers to (network ones, and
    perhaps others: those fail to enter as a network namespace and are skipped)."""
    found: dict[int, _Source] = {}
    try:
        nsfs = os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return []
    for pid in pids:
        for path, st in descriptor_stats(roots, pid):
            inode = st.st_ino
            if st.st_dev == nsfs and inode not in known and inode not in found:
                found[inode] = _Source(inode, path, f"descriptor {os.path.basename(path)} of "
                                                    f"pid {pid} ({read_comm(roots, pid)})")
    return sorted(found.values(), key=lambda s: s.inode)


def _collect(reads: list[_NsRead], match: NetMatch, problems: list[Unreadable]) -> NetScan:
    import socket  # noqa: PLC0415 (only where there is a network to read)

    interfaces: list[NetInterface] = []
    mine: dict[int, list[tuple[int, str]]] = {}  # netns -> (ifindex, name) of the device's
    for ns in reads:
        own = [m for m in ns.links if match.belongs(link_id(ns.source.inode, m))]
        if own:
            mine[ns.source.inode] = [(int(m["index"]), str(_attr(m, "IFLA_IFNAME")))
                                     for m in own]
    for ns in reads:
        inode = ns.source.inode
        by_index = {int(m["index"]): m for m in ns.links}
        picked: list[tuple[Any, str | None, int | None]] = [
            (by_index[i], None, None) for i, _ in mine.get(inode, [])
        ]
        # Interfaces stacked on the device's ones, here or (macvlan in a container) from
        # another namespace; and on those, recursively.
        foreign = [m for m in ns.links
                   if _kind(m) in UPPER_KINDS and _attr(m, "IFLA_LINK_NETNSID") is not None]
        for lower_ns, lowers in mine.items():
            if not foreign:
                break
            try:
                nsid = _peer_nsid(ns, lower_ns, reads)
            except Exception as exc:
                problems.append(Unreadable(
                    f"interfaces of network namespace {inode} stacked on others", str(exc)))
                continue
            if nsid is None:
                continue
            for m in foreign:
                if _attr(m, "IFLA_LINK_NETNSID") == nsid:
                    name = dict(lowers).get(_attr(m, "IFLA_LINK"))
                    if name is not None:
                        picked.append((m, name, lower_ns))
        todo = [(int(m["index"]), str(_attr(m, "IFLA_IFNAME"))) for m, _, _ in picked]
        while todo:
            index, name = todo.pop()
            for m in ns.links:
                if (_kind(m) in UPPER_KINDS and _attr(m, "IFLA_LINK") == index
                        and _attr(m, "IFLA_LINK_NETNSID") is None
                        and all(p[0] is not m for p in picked)):
                    picked.append((m, name, None))
                    todo.append((int(m["index"]), str(_attr(m, "IFLA_IFNAME"))))
        if not picked:
            continue
        try:
            addrs = list(ns.ipr.get_addr())
            routes = [*ns.ipr.route("dump", family=socket.AF_INET),
                      *ns.ipr.route("dump", family=socket.AF_INET6)]
        except Exception as exc:
            problems.append(Unreadable(f"addresses and routes of network namespace {inode}",
                                       str(exc)))
            addrs, routes = [], []
        for m, lower, lower_netns in picked:
            interfaces.append(_interface(ns, m, by_index, addrs, routes, lower=lower,
                                         lower_netns=lower_netns))
    return NetScan(
        interfaces=tuple(interfaces),
        namespaces=tuple(NetNamespaceRef(ns.source.inode, ns.source.where,
                                                    ns.source.path) for ns in reads),
        expected=match.expected,
        unreadable=tuple(problems),
    )


def _peer_nsid(ns: _NsRead, other: int, reads: list[_NsRead]) -> int | None:
    """The id under which namespace ``ns`` knows namespace ``other``, if it has one."""
    src = next(r.source for r in reads if r.source.inode == other)
    fd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        reply = ns.ipr.get_netnsid(fd=fd)
    finally:
        os.close(fd)
    nsid = reply.get("nsid") if isinstance(reply, dict) else None
    return nsid if isinstance(nsid, int) and nsid >= 0 else None


# ---------------------------------------------------------------------------------------
# Deciding (pure)


def _label(i: NetInterface) -> str:
    if i.lower is not None:
        return f"{i.name} ({i.kind or 'interface'} on {i.lower})"
    return i.name


def net_reasons(scan: NetScan) -> list[Reason]:
    """One reason per thing the host does with the device's interfaces: default and
    other gatewayed routes, addresses, bridge/bond/team membership, interfaces stacked on
    them, and being up; plus whatever could not be read."""
    out: list[Reason] = []
    for i in scan.interfaces:
        where = f"in network namespace {i.netns}"
        base = (i.name, i.netns, scan.where(i.netns))
        label = _label(i)
        for r in i.routes:
            if not r.is_default and r.gateway is None:
                continue  # the connected route of an address, reported with the address
            via = f"via {r.gateway}" if r.gateway else "no gateway"
            table = "" if r.table == 254 else f", table {r.table}"
            what = (f"the {'IPv6 ' if r.family == 6 else ''}default route" if r.is_default
                    else f"the route to {r.dst}")
            out.append(Reason(f"{label} carries {what} ({via}{table}) {where}",
                              NetworkRoute(*base, r.dst, r.gateway, r.table)))
        for a in i.addresses:
            if a.scope in ("link", "host"):
                continue  # configured by the kernel itself on every interface that is up
            out.append(Reason(f"{label} has address {a} {where}",
                              NetworkAddress(*base, str(a))))
        if i.master is not None:
            out.append(Reason(f"{label} is enslaved to {i.master_kind or 'device'} {i.master} "
                              f"{where}",
                              NetworkEnslaved(*base, i.master, i.master_kind)))
        if i.lower is not None:
            lower_where = (f" in network namespace {i.lower_netns}"
                           if i.lower_netns is not None else "")
            out.append(Reason(f"{i.kind or 'interface'} {i.name} {where} is stacked on "
                              f"{i.lower}{lower_where}",
                              NetworkStacked(*base, i.lower, i.kind)))
        if i.up:
            counters = ""
            if i.rx_bytes is not None and i.tx_bytes is not None:
                counters = (f", {human_bytes(i.rx_bytes)} received, "
                            f"{human_bytes(i.tx_bytes)} sent")
            out.append(Reason(f"{label} is up (state {i.operstate}{counters}) {where}",
                              NetworkUp(*base, i.operstate, i.rx_bytes, i.tx_bytes)))
    own = sum(1 for i in scan.interfaces if i.lower is None)
    if scan.expected is not None and own < scan.expected:
        missing = scan.expected - own
        out.append(Reason(
            f"{missing} of the device's {scan.expected} network interfaces are in a network "
            f"namespace safeusb cannot reach (pinned only by an open file or socket, or "
            f"unreadable)",
            CannotRead("network interfaces", f"{missing} not found")))
    for p in scan.unreadable:
        out.append(Reason(f"cannot read {p.what}: {p.error}", CannotRead(p.what, p.error)))
    return out
