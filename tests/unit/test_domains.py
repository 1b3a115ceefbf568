"""safeusbd following libvirt's domain events (safeusb.safeusbd.domains), `safeusb protect --all`
and the unprotected domains in `safeusb status`, against libvirt's test driver (its
events are real libvirt events, through libvirt-python's event loop)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from safeusb import protect
from safeusb.errors import UsageError
from safeusb.gate.launcher import GATE_ROOT, launcher_path
from safeusb.handover.policy import Policy, PolicyError
from safeusb.host.virt import Connection, Domain
from safeusb.protect import is_protected, protect_all, protect_xml
from safeusb.safeusbd.domains import DomainWatch, domain_active
from safeusb.status import collect
from tests.unit.fakesys import FakeSystem

libvirt = pytest.importorskip("libvirt")

URI = "test:///default"  # one shared instance per process: names here are unique
HANG = 10.0
EMULATOR = "/usr/bin/qemu-system-x86_64"


def domain_xml(name: str, emulator: str = EMULATOR, memory: int = 1024) -> str:
    return (f"<domain type='test'><name>{name}</name><uuid>{uuid.uuid5(uuid.NAMESPACE_DNS, name)}"
            f"</uuid><memory>{memory}</memory><os><type>hvm</type></os>"
            f"<devices><emulator>{emulator}</emulator></devices></domain>")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def conn() -> Iterator[Any]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    c = libvirt.open(URI)
    made: list[str] = []
    c.made = made  # names to undefine afterwards
    yield c
    for name in made:
        try:
            dom = c.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass
    c.close()


def define(conn: Any, name: str, **kwargs: Any) -> Any:
    conn.made.append(name)
    return conn.defineXML(domain_xml(name, **kwargs))


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {HANG} s: {what}")
        time.sleep(0.02)


class Seen:
    def __init__(self, protect_new: bool = True) -> None:
        self.protect_new = protect_new
        self.protected: list[str] = []
        self.stopped: list[str] = []
        self.lock = threading.Lock()

    def protect(self, _conn: Connection, dom: Domain) -> str:
        with self.lock:
            self.protected.append(dom.name)
        return f"{dom.name}: emulator {GATE_ROOT}{EMULATOR}"


@pytest.fixture
def watch() -> Iterator[tuple[DomainWatch, Seen]]:
    seen = Seen()
    w = DomainWatch(URI, lambda: seen.protect_new, seen.protect, seen.stopped.append)
    w.start()
    assert w.connected.wait(HANG), "the watch did not connect to the test driver"
    yield w, seen
    w.stop()
    assert not w.thread.is_alive()


def test_a_new_domain_is_protected_an_updated_one_is_not(
        conn: Any, watch: tuple[DomainWatch, Seen]) -> None:
    w, seen = watch
    name = unique("new")
    define(conn, name)
    until(lambda: name in seen.protected, "protected on DEFINED/ADDED")
    define(conn, name, memory=2048)  # DEFINED/UPDATED, as `safeusb unprotect` causes
    other = unique("marker")
    define(conn, other)  # events come in order: once this is seen, the update was too
    until(lambda: other in seen.protected, "the marker protected")
    assert seen.protected.count(name) == 1 and w.protected.count(name) == 1


def test_protect_new_domains_off_protects_nothing(
        conn: Any, watch: tuple[DomainWatch, Seen]) -> None:
    _, seen = watch
    seen.protect_new = False
    name = unique("off")
    define(conn, name)
    dom = conn.lookupByName(name)
    dom.create()
    dom.destroy()  # STOPPED comes after DEFINED: once seen, DEFINED was handled
    until(lambda: name in seen.stopped, "STOPPED told")
    assert name not in seen.protected


def test_a_policy_that_cannot_be_read_protects_nothing(
        conn: Any, caplog: pytest.LogCaptureFixture) -> None:
    seen = Seen()

    def broken() -> bool:
        raise PolicyError("/etc/safeusb/policy.toml", "not obeyed")

    w = DomainWatch(URI, broken, seen.protect, seen.stopped.append)
    w.start()
    try:
        assert w.connected.wait(HANG)
        name = unique("broken")
        define(conn, name)
        dom = conn.lookupByName(name)
        dom.create()
        dom.destroy()
        until(lambda: name in seen.stopped, "STOPPED told")
    finally:
        w.stop()
    assert seen.protected == []
    assert f"domain {name} defined; not protected: policy /etc/safeusb/policy.toml" \
        in caplog.text


def test_stopped_domains_are_told(conn: Any, watch: tuple[DomainWatch, Seen]) -> None:
    _, seen = watch
    name = unique("stop")
    define(conn, name)
    dom = conn.lookupByName(name)
    dom.create()
    assert name not in seen.stopped
    dom.destroy()
    until(lambda: name in seen.stopped, "STOPPED told")


def test_started_domains_are_told(conn: Any) -> None:
    """STARTED goes to the started callback (attach_to's devices waiting on the host)."""
    seen = Seen()
    started: list[str] = []
    w = DomainWatch(URI, lambda: False, seen.protect, seen.stopped.append,
                    started=started.append)
    w.start()
    try:
        assert w.connected.wait(HANG)
        name = unique("start")
        define(conn, name)
        conn.lookupByName(name).create()
        until(lambda: name in started, "STARTED told")
        assert name not in seen.stopped
    finally:
        w.stop()


def test_reconnects_after_the_connection_closes(
        conn: Any, watch: tuple[DomainWatch, Seen]) -> None:
    """libvirtd restarting closes the connection (close callback): opened again, events
    registered again."""
    w, seen = watch
    first = w.conn
    w._on_close(libvirt.VIR_CONNECT_CLOSE_REASON_EOF)
    until(lambda: w.conn is not None and w.conn is not first, "a new connection")
    name = unique("again")
    define(conn, name)
    until(lambda: name in seen.protected, "events after reconnecting")


def test_unreachable_libvirt_is_said_once_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    seen = Seen()
    w = DomainWatch("test:///nonexistent/file.xml", lambda: True, seen.protect,
                    seen.stopped.append, retry=0.05)
    w.start()
    time.sleep(0.3)
    w.stop()
    said = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(said) == 1 and "trying again every 0.05 s" in said[0].getMessage()
    assert not w.connected.is_set()


def test_domain_active(conn: Any) -> None:
    name = unique("active")
    define(conn, name)
    active = domain_active(URI)
    assert active(name) is False
    conn.lookupByName(name).create()
    assert active(name) is True
    assert active(unique("none")) is False
    assert domain_active("test:///nonexistent/file.xml")(name) is None


# --- protect --all, status -----------------------------------------------------------------

@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher symlink under GATE_ROOT is the system layer, tested on the VM tier."""
    monkeypatch.setattr(protect, "ensure_launcher", lambda real, *a, **k: launcher_path(real))


def test_protect_all(conn: Any, no_launcher: None) -> None:
    fresh, done, transient = unique("fresh"), unique("done"), unique("transient")
    define(conn, fresh)
    root = protect.parse_xml(domain_xml(done).encode(), done)
    conn.made.append(done)
    conn.defineXML(protect.to_text(protect_xml(root, done)))
    conn.made.append(transient)
    conn.createXML(domain_xml(transient), 0)
    lines, ok = protect_all(URI)
    assert f"{fresh}: emulator {GATE_ROOT}{EMULATOR}" in lines
    assert f"{done}: already protected (emulator {GATE_ROOT}{EMULATOR})" in lines
    assert not any(transient in line for line in lines)  # no definition to change
    # the test driver's own domain "test" has no emulator: said, and the run fails
    assert "test: NOT protected: the domain has no <devices><emulator>" in lines
    assert ok is False
    assert is_protected(protect.parse_xml(
        conn.lookupByName(fresh).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode(), fresh))
    lines, _ = protect_all(URI)
    assert f"{fresh}: already protected (emulator {GATE_ROOT}{EMULATOR})" in lines


def test_protect_all_usage(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse  # noqa: PLC0415

    with pytest.raises(UsageError, match="--all goes with protect and no DOMAIN"):
        protect.run(argparse.Namespace(command="protect", domain="g1", all=True,
                                       connect=URI))
    with pytest.raises(UsageError, match="give a DOMAIN or --all"):
        protect.run(argparse.Namespace(command="protect", domain=None, all=False,
                                       connect=URI))


def test_status_lists_unprotected_domains(tmp_path: Path, conn: Any,
                                          no_launcher: None) -> None:
    fs = FakeSystem(tmp_path)
    fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    bare, guarded = unique("bare"), unique("guarded")
    define(conn, bare)
    define(conn, guarded)
    with Connection.open(URI) as ours:
        protect.change_on(ours, ours.domain(guarded), True)
    status = collect(fs.roots, URI)
    assert status.unprotected is not None
    assert bare in status.unprotected and guarded not in status.unprotected
    lines = status.as_text().splitlines()
    assert lines[-1] == f"libvirt: connected to {URI}"
    assert lines[-2].startswith("domains not protected (live USB hotplug into them is not "
                                "guarded; `safeusb protect --all`): ") and bare in lines[-2]
    doc = status.as_json()
    assert bare in doc["unprotected_domains"] and guarded not in doc["unprotected_domains"]


def test_policy_service_section() -> None:
    assert Policy.from_text("").protect_new_domains is False
    assert Policy.from_text("[service]\nprotect_new_domains = true\n").protect_new_domains
    with pytest.raises(PolicyError, match=r"<policy>:2: \[service\]: unknown key 'protect'"):
        Policy.from_text("[service]\nprotect = true\n")
    with pytest.raises(PolicyError, match="protect_new_domains must be true or false"):
        Policy.from_text("[service]\nprotect_new_domains = \"yes\"\n")
    with pytest.raises(PolicyError, match=r"\[service\] must be a table"):
        Policy.from_text("service = 1\n")
