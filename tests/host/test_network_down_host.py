"""network = "down": an interface is taken down and, once it comes back as a new
interface in the host's namespace under another name (as a rebound driver makes it),
put back in its namespace with its name, addresses, state and routes. Real network
namespaces and veth pairs stand in for a USB adapter."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from safeusb.handover.plan import down_link
from safeusb.host.runner import Runner
from tests.host.test_network_host import NetLab, by_name, lab, ns_inode, scan

pytestmark = pytest.mark.host

__all__ = ["lab"]  # the fixture, shared


def _ip(*args: str) -> object:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


@pytest.fixture
def adapter(lab: NetLab) -> Iterator[tuple[NetLab, str, str, str]]:
    ns = lab.ns("dn")
    host, inner = lab.name("hd"), lab.name("dd")
    lab.veth(host, inner)
    lab.ip(None, "link", "set", inner, "netns", ns)
    lab.ip(ns, "addr", "add", "10.82.0.2/24", "dev", inner)
    lab.ip(ns, "link", "set", inner, "up")
    lab.ip(ns, "route", "add", "default", "via", "10.82.0.1", "dev", inner)
    lab.ip(ns, "route", "add", "10.99.0.0/16", "via", "10.82.0.1", "dev", inner)
    yield lab, ns, host, inner


def test_down_then_back_from_the_host_namespace_under_a_new_name(
    adapter: tuple[NetLab, str, str, str],
) -> None:
    lab, ns, _host, inner = adapter
    inode = ns_inode(f"/run/netns/{ns}")
    found = scan(by_name({inode: {inner}}))
    (iface,) = found.interfaces
    step = down_link(iface, found.namespaces, "9-9")
    # What was configured by hand is kept; the kernel's connected route and the
    # link-local IPv6 address are not (they come back by themselves).
    assert step.addresses == ((4, "10.82.0.2", 24),)
    assert {(d, g) for _, d, g, _ in step.routes} == {("default", "10.82.0.1"),
                                                      ("10.99.0.0/16", "10.82.0.1")}
    runner = Runner()
    runner.link_down(step)
    (link,) = _ip("-n", ns, "link", "show", inner)
    assert "UP" not in link["flags"]
    assert not [r for r in _ip("-n", ns, "route", "show", "default")]

    # The driver lets go and binds again: a new interface in the host's namespace.
    temp = lab.name("tmp")
    lab.ip(ns, "link", "set", inner, "name", temp)
    lab.ip(ns, "link", "set", temp, "netns", "1")
    lab.links.append(temp)  # cleaned up from here if the restore fails
    assert not _ip("-n", ns, "link", "show")[1:]  # only lo is left there

    runner.link_restore(step, timeout=5)
    (link,) = _ip("-n", ns, "link", "show", inner)
    assert "UP" in link["flags"]
    (addr,) = _ip("-n", ns, "-4", "addr", "show", "dev", inner)
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("10.82.0.2", 24)]
    routes = {(r["dst"], r.get("gateway")) for r in _ip("-n", ns, "-4", "route", "show")}
    assert {("default", "10.82.0.1"), ("10.99.0.0/16", "10.82.0.1")} <= routes
    assert any("move the interface with index" in x for x in runner.log_lines)


def test_restore_in_place_after_a_failed_handoff(adapter: tuple[NetLab, str, str, str]) -> None:
    """Rollback: the interface never left; it is set up and its routes come back."""
    _lab, ns, _host, inner = adapter
    inode = ns_inode(f"/run/netns/{ns}")
    found = scan(by_name({inode: {inner}}))
    step = down_link(found.interfaces[0], found.namespaces, "9-9")
    runner = Runner()
    runner.link_down(step)
    runner.link_restore(step, timeout=5)
    routes = {(r["dst"], r.get("gateway")) for r in _ip("-n", ns, "-4", "route", "show")}
    assert ("default", "10.82.0.1") in routes


def test_gone_namespace_is_a_clear_failure(adapter: tuple[NetLab, str, str, str]) -> None:
    lab, ns, _host, inner = adapter
    inode = ns_inode(f"/run/netns/{ns}")
    found = scan(by_name({inode: {inner}}))
    step = down_link(found.interfaces[0], found.namespaces, "9-9")
    Runner().link_down(step)
    lab.ip(None, "netns", "del", ns)
    lab.netns.remove(ns)
    with pytest.raises(Exception, match="no longer exists"):
        Runner().link_restore(step, timeout=1)
