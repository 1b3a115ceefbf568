"""Network interfaces in real network namespaces (root): veth pairs, a bridge, macvlan,
addresses and default routes, with the device-to-interface mapping injected."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from safeusb.host.model import LinkId, NetScan
from safeusb.host.netinfo import NetMatch, net_reasons, read_network
from safeusb.host.procfs import list_pids, read_mount_namespaces
from safeusb.host.roots import Roots
from safeusb.host.selector import Selector, resolve
from safeusb.host.snapshot import read_snapshot
from safeusb.inspect.decide import inspect as decide
from safeusb.inspect.report import as_json, as_text
from tests.conftest import require_root
from tests.host.conftest import Loop, background, run

pytestmark = pytest.mark.host


def ns_inode(path: str) -> int:
    return os.stat(path).st_ino


@dataclass
class NetLab:
    """Namespaces and interfaces made for one test, all removed afterwards."""

    tag: str
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def ns(self, short: str) -> str:
        name = f"su{self.tag}{short}"
        run("ip", "netns", "add", name)
        self.netns.append(name)
        return name

    def veth(self, a: str, b: str) -> None:
        run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        self.links.append(a)

    def ip(self, ns: str | None, *args: str) -> None:
        run(*(["ip", "-n", ns] if ns else ["ip"]), *args)

    def name(self, short: str) -> str:
        return f"su{self.tag}{short}"[:15]


@pytest.fixture
def lab() -> Iterator[NetLab]:
    require_root()
    lab = NetLab(tag=f"{os.getpid() % 10000}")
    try:
        yield lab
    finally:
        for link in lab.links:
            run("ip", "link", "del", link, check=False)
        for ns in lab.netns:
            run("ip", "netns", "del", ns, check=False)


def by_name(names: dict[int, set[str]], expected: int | None = None) -> NetMatch:
    """Interfaces named per namespace inode stand in for the device's."""

    def belongs(link: LinkId) -> bool:
        return link.name in names.get(link.netns, set())

    return NetMatch(belongs, expected if expected is not None else
                    sum(len(v) for v in names.values()))


def scan(match: NetMatch) -> NetScan:
    roots = Roots.host()
    pids = list_pids(roots)
    return read_network(roots, pids, read_mount_namespaces(roots, pids).namespaces, match)


def texts(s: NetScan) -> list[str]:
    return [f.text for f in net_reasons(s)]


def test_default_route_and_address_in_another_namespace(lab: NetLab) -> None:
    ns = lab.ns("a")
    inode = ns_inode(f"/run/netns/{ns}")
    host, inner = lab.name("h0"), lab.name("d0")
    lab.veth(host, inner)
    lab.ip(None, "link", "set", inner, "netns", ns)
    lab.ip(ns, "addr", "add", "10.77.0.2/24", "dev", inner)
    lab.ip(ns, "link", "set", inner, "up")
    lab.ip(None, "link", "set", host, "up")
    lab.ip(ns, "route", "add", "default", "via", "10.77.0.1")
    lab.ip(ns, "route", "add", "10.99.0.0/16", "via", "10.77.0.9")
    # Not in this namespace's sysfs: only reachable by entering the namespace.
    assert not os.path.exists(f"/sys/class/net/{inner}")
    s = scan(by_name({inode: {inner}}))
    (iface,) = s.interfaces
    assert iface.name == inner and iface.netns == inode and iface.up
    assert [str(a) for a in iface.addresses if a.scope == "global"] == ["10.77.0.2/24"]
    assert iface.routes[0].is_default and iface.routes[0].gateway == "10.77.0.1"
    assert s.where(inode) == f"/run/netns/{ns}"
    lines = texts(s)
    assert lines[0] == (f"{inner} carries the default route (via 10.77.0.1) "
                        f"in network namespace {inode}")
    assert (f"{inner} carries the route to 10.99.0.0/16 (via 10.77.0.9) "
            f"in network namespace {inode}") in lines
    assert f"{inner} has address 10.77.0.2/24 in network namespace {inode}" in lines
    assert any(t.startswith(f"{inner} is up (state ") for t in lines)
    # Link-local IPv6 addresses the kernel adds are listed, not reasons of their own.
    assert not any("fe80:" in t for t in lines)


def test_idle_interface_gives_no_reason_and_up_one_does(lab: NetLab) -> None:
    ns = lab.ns("b")
    inode = ns_inode(f"/run/netns/{ns}")
    host, inner = lab.name("h1"), lab.name("d1")
    lab.veth(host, inner)
    lab.ip(None, "link", "set", inner, "netns", ns)
    match = by_name({inode: {inner}})
    s = scan(match)
    assert [i.name for i in s.interfaces] == [inner]
    assert texts(s) == []
    lab.ip(ns, "link", "set", inner, "up")
    (line,) = texts(scan(match))
    assert line.startswith(f"{inner} is up (state ") and "received" in line


def test_enslaved_to_a_bridge(lab: NetLab) -> None:
    ns = lab.ns("c")
    inode = ns_inode(f"/run/netns/{ns}")
    host, inner, bridge = lab.name("h2"), lab.name("d2"), lab.name("br")
    lab.veth(host, inner)
    lab.ip(None, "link", "set", inner, "netns", ns)
    lab.ip(ns, "link", "add", bridge, "type", "bridge")
    lab.ip(ns, "link", "set", inner, "master", bridge)
    lab.ip(ns, "addr", "add", "10.78.0.1/24", "dev", bridge)
    (line,) = texts(scan(by_name({inode: {inner}})))
    assert line == f"{inner} is enslaved to bridge {bridge} in network namespace {inode}"


def test_enslaved_to_a_bond(lab: NetLab) -> None:
    bond = lab.name("bo")
    if run("ip", "link", "add", bond, "type", "bond", check=False).returncode != 0:
        pytest.skip("this kernel has no bonding driver (ip link add type bond fails)")
    lab.links.append(bond)
    host, inner = lab.name("h3"), lab.name("d3")
    lab.veth(host, inner)
    lab.ip(None, "link", "set", inner, "master", bond)
    own = ns_inode("/proc/self/ns/net")
    lines = texts(scan(by_name({own: {inner}})))
    assert f"{inner} is enslaved to bond {bond} in network namespace {own}" in lines


def test_macvlan_moved_to_another_namespace_is_found(lab: NetLab) -> None:
    """A container's macvlan on the device's interface: stacked, in another namespace."""
    ns = lab.ns("d")
    inode = ns_inode(f"/run/netns/{ns}")
    own = ns_inode("/proc/self/ns/net")
    host, peer, mac = lab.name("h4"), lab.name("d4"), lab.name("mv")
    lab.veth(host, peer)
    lab.ip(None, "link", "add", "link", host, "name", mac, "type", "macvlan")
    lab.ip(None, "link", "set", mac, "netns", ns)
    lab.ip(ns, "addr", "add", "10.79.0.5/24", "dev", mac)
    lab.ip(ns, "link", "set", mac, "up")
    lab.ip(None, "link", "set", host, "up")
    s = scan(by_name({own: {host}}))
    stacked = next(i for i in s.interfaces if i.name == mac)
    assert stacked.netns == inode and stacked.lower == host and stacked.lower_netns == own
    lines = texts(s)
    assert (f"macvlan {mac} in network namespace {inode} is stacked on {host} "
            f"in network namespace {own}") in lines
    assert f"{mac} (macvlan on {host}) has address 10.79.0.5/24 in network namespace {inode}" \
        in lines


def test_namespace_pinned_by_a_mount_in_a_private_mount_namespace(
    lab: NetLab, tmp_path: Path
) -> None:
    """Neither a process nor /run/netns: only a bind mount that this mount namespace
    does not see holds the network namespace."""
    require_root()
    pin = tmp_path / "pin"
    pin.touch()
    inner = lab.name("d5")
    script = (f"unshare --net={pin} true && "
              f"nsenter --net={pin} ip link add {inner} type veth peer name {inner}p && "
              f"nsenter --net={pin} ip addr add 10.80.0.2/24 dev {inner} && "
              f"echo ready && exec sleep 600")
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
    with background(argv, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        inode = int(run("nsenter", "-t", str(proc.pid), "-m", "stat", "-c", "%i",
                        str(pin)).stdout)
        assert inode != ns_inode(f"/proc/{proc.pid}/ns/net")
        s = scan(by_name({inode: {inner}}))
        assert [i.name for i in s.interfaces] == [inner]
        assert s.where(inode) == str(pin)
        assert f"{inner} has address 10.80.0.2/24 in network namespace {inode}" in texts(s)


def test_namespace_held_only_by_an_open_file_is_found(lab: NetLab) -> None:
    """A namespace kept by nothing but a descriptor: found when the device's interface
    count (which its sysfs directory gives for real devices) says one is missing."""
    ns = lab.ns("e")
    inode = ns_inode(f"/run/netns/{ns}")
    host, inner = lab.name("h6"), lab.name("d6")
    lab.veth(host, inner)
    lab.ip(None, "link", "set", inner, "netns", ns)
    lab.ip(ns, "addr", "add", "10.82.0.2/24", "dev", inner)
    code = ("import os,sys,time; fd=os.open(sys.argv[1], os.O_RDONLY); "
            "print(fd, flush=True); time.sleep(600)")
    with background([sys.executable, "-c", code, f"/run/netns/{ns}"],
                    stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        fd = int(proc.stdout.readline())
        run("ip", "netns", "del", ns)
        lab.netns.remove(ns)
        # Told nothing is missing, safeusb does not look at descriptors.
        quiet = scan(NetMatch(by_name({inode: {inner}}).belongs, None))
        assert quiet.interfaces == (), quiet.namespaces
        s = scan(by_name({inode: {inner}}, expected=1))
        assert [i.name for i in s.interfaces] == [inner]
        comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
        assert s.where(inode) == f"descriptor {fd} of pid {proc.pid} ({comm})"
        assert texts(s) == [f"{inner} has address 10.82.0.2/24 in network namespace {inode}"]


# A process that enters a network namespace, opens a socket there and goes back: the
# socket alone keeps the namespace alive.
_SOCKET_PIN = """
import ctypes, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
home = os.open("/proc/self/ns/net", os.O_RDONLY)
there = os.open(sys.argv[1], os.O_RDONLY)
assert libc.setns(there, 0x40000000) == 0
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
assert libc.setns(home, 0x40000000) == 0
os.close(there)
print("ready", flush=True)
time.sleep(600)
"""


def test_namespace_held_only_by_a_socket_fails_closed(lab: NetLab) -> None:
    ns = lab.ns("g")
    inode = ns_inode(f"/run/netns/{ns}")
    host, inner = lab.name("h8"), lab.name("d8")
    lab.veth(host, inner)
    lab.ip(None, "link", "set", inner, "netns", ns)
    with background([sys.executable, "-c", _SOCKET_PIN, f"/run/netns/{ns}"],
                    stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        run("ip", "netns", "del", ns)
        lab.netns.remove(ns)
        # The interface still exists (its namespace lives on), but nothing names it.
        assert run("ip", "link", "show", host).returncode == 0
        s = scan(by_name({inode: {inner}}, expected=1))
        assert s.interfaces == ()
        (line,) = texts(s)
        assert line.startswith("1 of the device's 1 network interfaces are in a network "
                               "namespace safeusb cannot reach")


def test_network_reasons_reach_inspect_and_json(
    lab: NetLab, loop_ext4: Loop
) -> None:
    ns = lab.ns("f")
    inode = ns_inode(f"/run/netns/{ns}")
    host, inner = lab.name("h7"), lab.name("d7")
    lab.veth(host, inner)
    lab.ip(None, "link", "set", inner, "netns", ns)
    lab.ip(ns, "addr", "add", "10.81.0.2/24", "dev", inner)
    lab.ip(ns, "link", "set", inner, "up")
    lab.ip(ns, "route", "add", "default", "dev", inner)
    roots = Roots.host()
    target = resolve(Selector.from_string(loop_ext4.node), roots)
    f = decide(read_snapshot(roots, target, net_match=by_name({inode: {inner}})))
    assert not f.free
    assert (f"{inner} carries the default route (no gateway) in network namespace {inode}"
            in as_text(f))
    doc = as_json(f)
    (iface,) = doc["network_interfaces"]
    assert iface["name"] == inner and iface["netns"] == inode and iface["up"] is True
    assert "10.81.0.2/24" in iface["addresses"]
    causes = {r["cause"] for r in doc["reasons"] if r["kind"] == "network"}
    assert causes == {"default-route", "address", "up"}
