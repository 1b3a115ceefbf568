"""safeusbd's following of handed-over devices (safeusb.safeusbd.events), on built sysfs trees with
a fake event source and fake node holders; the real kernel is in tests/vm/test_events_vm.py."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from safeusb.host import virt
from safeusb.host.journal import Record, StateDir, new_record
from safeusb.host.procfs import node_holders
from safeusb.host.roots import Roots
from safeusb.host.snapshot import keep_device
from safeusb.host.sysfs import device_now
from safeusb.safeusbd import events
from safeusb.safeusbd.events import EventLoop, HandoverWatch, UEvent
from safeusb.safeusbd.server import keep_devices, usb_at
from tests.unit.fakesys import FakeSystem

HANG = 10.0
KEY = "2-1"
HANDOFF = {"kind": "handoff", "text": "hold /dev/sda; unbind usb-storage from 2-1:1.0",
           "disks": ["/dev/sda"], "interfaces": [["2-1:1.0", "usb-storage"]]}
UNMOUNT = {"kind": "unmount", "text": "unmount /srv in mount namespace 1", "device": "sda",
           "source": "/dev/sda", "mountpoint": "/srv", "fstype": "ext4", "options": "rw",
           "mnt_ns": 1, "pid": 1}


class Host:
    """A stick at 2-1 (bus 2 device 3), a state directory, who holds its node, what was
    given back."""

    def __init__(self, tmp_path: Path) -> None:
        self.fs = FakeSystem(tmp_path / "root")
        self.path = self.fs.usb_device(KEY, 0x46F4, 0x0001, busnum=2, devnum=3)
        self.state = StateDir(str(tmp_path / "state"))
        self.open_by: list[tuple[int, str]] = []
        self.given: list[str] = []
        self.active: dict[str, bool | None] = {}
        self.qemu: dict[str, int] = {"g1": 401}  # libvirt's pid files
        self.now = 1000.0  # the watch's monotonic clock

    def driver(self, name: str | None) -> None:
        link = self.path / f"{KEY}:1.0" / "driver"
        link.unlink(missing_ok=True)
        if name is not None:
            target = self.fs.sys / "bus/usb/drivers" / name
            target.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(target, link.parent))

    def record(self, *steps: dict[str, object], domain: str | None = "g1",
               after_refusal: bool = False) -> Record:
        record = new_record(KEY, domain, list(steps), True, after_refusal)
        self.state.save(record)
        return record

    def give_back(self, key: str, record: Record) -> tuple[bool, list[str]]:
        self.given.append(key)
        self.state.remove(key)
        return True, [f"undo: {s['text']}" for s in reversed(record.steps)]

    def watch(self) -> HandoverWatch:
        return HandoverWatch(self.fs.roots, self.state, self.give_back,
                             holders=lambda dev: list(self.open_by),
                             domain_active=lambda name: self.active.get(name),
                             domain_pid=lambda name: self.qemu.get(name),
                             clock=lambda: self.now)

    def handed_over(self, domain: str | None = "g1",
                    after_refusal: bool = False) -> HandoverWatch:
        """A record with the handoff done, the driver unbound: what prepare leaves
        (safeusbd's prepare on a kernel guard refusal, with after_refusal)."""
        self.record(UNMOUNT, HANDOFF, domain=domain, after_refusal=after_refusal)
        self.driver(None)
        return self.watch()


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_device_now_reads_drivers_and_node(host: Host) -> None:
    now = device_now(host.fs.roots, KEY)
    assert now is not None and now.dev == "189:130"
    assert now.drivers == {"2-1:1.0": "usb-storage"} and not now.claimed
    host.driver("usbfs")
    now = device_now(host.fs.roots, KEY)
    assert now is not None and now.claimed
    host.driver(None)
    now = device_now(host.fs.roots, KEY)
    assert now is not None and now.drivers == {"2-1:1.0": None}
    assert device_now(host.fs.roots, "2-9") is None


def test_not_yet_opened_by_qemu_is_left_alone(host: Host) -> None:
    """Between prepare and QEMU opening the device it is unclaimed and closed, as after
    QEMU let go: never given back for that. It is looked at again soon while it is new
    (QEMU opening the node makes no uevent), then only at the periodic look."""
    watch = host.handed_over()
    for _ in range(3):
        assert watch.scan() is True
    host.now += events.WATCH_NEW
    assert watch.scan() is False
    assert host.given == [] and host.state.load(KEY) is not None
    assert watch.tracked[KEY].phase == events.WAITING and watch.watching()


def test_opened_and_closed_by_a_paused_qemu_soon_after_prepare_is_given_back(
        host: Host) -> None:
    """A paused domain's QEMU opens the node (no uevent, nothing claimed) and is detached
    a few seconds later: the follow-up looks saw it held, so it is given back."""
    watch = host.handed_over()
    assert watch.scan() is True  # the look right after prepare: not yet opened
    host.now += 0.5
    host.open_by = [(401, "qemu-system-x86")]
    watch.scan()  # a follow-up
    assert watch.tracked[KEY].phase == events.HELD
    host.now += 3
    host.open_by = []
    watch.scan()
    assert host.given == [KEY]


def test_held_then_let_go_is_given_back_once(host: Host,
                                             caplog: pytest.LogCaptureFixture) -> None:
    watch = host.handed_over()
    host.driver("usbfs")
    host.open_by = [(401, "qemu-system-x86")]
    watch.scan()
    assert watch.tracked[KEY].phase == events.HELD and host.given == []
    host.driver(None)  # QEMU released its claim ...
    assert watch.scan() is True  # ... but still has the node open: look again soon
    assert host.given == []
    host.open_by = []  # ... and closed it
    with caplog.at_level(logging.INFO, logger="safeusb"):
        assert watch.scan() is False
    assert host.given == [KEY] and host.state.load(KEY) is None
    assert not watch.watching()
    text = caplog.text
    assert "2-1 is back on the host (QEMU let go of it" in text
    assert "undo: unmount /srv" in text and "given back to the host; record removed" in text
    watch.scan()
    assert host.given == [KEY]


def test_driver_bound_again_by_qemu_counts_as_let_go(host: Host) -> None:
    """`virsh detach-device`: QEMU releases the interfaces and has the kernel bind
    usb-storage again before it closes the node."""
    watch = host.handed_over()
    host.driver("usbfs")
    host.open_by = [(401, "qemu-system-x86")]
    watch.scan()
    host.driver("usb-storage")
    host.open_by = []
    watch.scan()
    assert host.given == [KEY]


def test_held_by_an_open_node_alone(host: Host) -> None:
    """QEMU holds the node with no interface claimed (a reset in progress): held."""
    watch = host.handed_over()
    host.open_by = [(401, "qemu-system-x86")]
    watch.scan()
    assert watch.tracked[KEY].phase == events.HELD
    assert watch.scan() is True and host.given == []
    host.open_by = []
    watch.scan()
    assert host.given == [KEY]


def test_another_process_opening_the_node_takes_nothing(host: Host) -> None:
    """lsusb or a udev helper opening the node before QEMU does is not QEMU taking it:
    its closing gives nothing back (the domain may be about to open it)."""
    watch = host.handed_over()
    host.open_by = [(77, "lsusb")]
    watch.scan()
    assert watch.tracked[KEY].phase == events.WAITING
    host.open_by = []
    watch.scan()
    assert host.given == []
    host.open_by = [(401, "qemu-system-x86")]
    watch.scan()
    assert watch.tracked[KEY].phase == events.HELD


def test_let_go_waits_for_every_holder(host: Host) -> None:
    """QEMU gone, but another process has the node open (or claims it): looked at again,
    given back once nobody has it."""
    watch = host.handed_over()
    host.open_by = [(401, "qemu-system-x86")]
    watch.scan()
    host.open_by = [(77, "lsusb")]
    assert watch.scan() is True and host.given == []
    host.open_by = []
    host.driver("usbfs")  # a program of the user's claimed it
    assert watch.scan() is True and host.given == []
    host.driver(None)
    watch.scan()
    assert host.given == [KEY]


def test_without_a_domain_a_claim_takes_it_and_a_probe_does_not(host: Host) -> None:
    """No domain: no process to tell from a probe (a program asking usbfs, lsusb) that
    opens the node for a moment. The device is taken once an interface is claimed; once
    taken, the node open alone keeps it (a reset), and it comes back when closed."""
    host.record(UNMOUNT, HANDOFF, domain=None)
    host.driver(None)
    watch = host.watch()
    host.open_by = [(900, "python3")]
    watch.scan()
    assert watch.tracked[KEY].phase != events.HELD
    host.open_by = []
    watch.scan()
    assert host.given == []  # the probe closed it: nothing to give back
    host.driver("usbfs")
    host.open_by = [(901, "qemu-system-x86")]
    watch.scan()
    assert watch.tracked[KEY].phase == events.HELD
    host.driver(None)
    watch.scan()
    assert host.given == [] and watch.tracked[KEY].phase == events.HELD
    host.open_by = []
    watch.scan()
    assert host.given == [KEY]


def test_libvirts_qemu_pid_is_read_only_from_a_root_file(tmp_path: Path) -> None:
    (tmp_path / "g1.pid").write_text("4242\n")
    (tmp_path / "g1.pid").chmod(0o644)
    expected = 4242 if os.geteuid() == 0 else None  # read_pid_file wants root's file
    assert virt.qemu_pid("g1", str(tmp_path)) == expected
    assert virt.qemu_pid("none", str(tmp_path)) is None
    assert virt.qemu_pid("../g1", str(tmp_path)) is None


def test_device_gone_removes_its_record(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    watch = host.handed_over()
    host.driver("usbfs")
    watch.scan()
    shutil.rmtree(host.path)
    (host.fs.sys / "bus/usb/devices" / KEY).unlink()
    with caplog.at_level(logging.INFO, logger="safeusb"):
        watch.scan()
    assert host.given == [] and host.state.load(KEY) is None and not watch.watching()
    assert "2-1 left the host while handed over to domain g1 (no device is at its port)" \
        in caplog.text
    assert "not given back: unmount /srv in mount namespace 1; hold /dev/sda" in caplog.text


def test_another_device_at_the_port_means_the_first_is_gone(host: Host) -> None:
    watch = host.handed_over()
    host.driver("usbfs")
    watch.scan()
    (host.path / "dev").write_text("189:131\n")  # re-enumerated: device 4
    host.driver("usb-storage")
    watch.scan()
    assert host.given == [] and host.state.load(KEY) is None


def test_domain_stopped_gives_back_what_it_never_took(host: Host) -> None:
    watch = host.handed_over()
    watch.scan()
    watch.domain_stopped("g2")
    watch.scan()
    assert host.given == []
    watch.domain_stopped("g1")
    watch.scan()
    assert host.given == [KEY]


def test_domain_stopped_while_still_held_waits_for_the_node(host: Host) -> None:
    watch = host.handed_over()
    host.driver("usbfs")
    watch.domain_stopped("g1")
    watch.scan()
    assert host.given == []


@pytest.mark.parametrize(("active", "given"), [(False, True), (True, False), (None, False)])
def test_at_startup_libvirt_decides_for_devices_nobody_holds(
        host: Host, active: bool | None, given: bool) -> None:
    """safeusbd started after QEMU let go: given back only if libvirt says the domain is
    not running; running or unknown: waiting."""
    watch = host.handed_over()
    host.active["g1"] = active
    watch.scan()
    assert (host.given == [KEY]) is given
    watch.scan()
    assert (host.given == [KEY]) is given


def test_a_record_without_handoff_is_not_touched(host: Host) -> None:
    """A prepare in progress (or stopped part-way) writes records without a handoff."""
    host.record(UNMOUNT)
    host.driver(None)
    watch = host.watch()
    host.active["g1"] = False
    watch.scan()
    shutil.rmtree(host.path)
    watch.scan()
    assert host.given == [] and host.state.load(KEY) is not None and not watch.watching()


def test_a_busy_lock_is_tried_again(host: Host) -> None:
    watch = host.handed_over()
    host.driver("usbfs")
    host.open_by = [(401, "qemu-system-x86")]
    watch.scan()
    host.driver(None)
    host.open_by = []
    with host.state.lock(KEY):
        assert watch.scan() is True
        assert host.given == []
    watch.scan()
    assert host.given == [KEY]


def test_untrusted_records_are_reported_and_left(host: Host,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    watch = host.handed_over()
    bad = Path(host.state.path) / "2-2.json"
    bad.write_text("{not json")
    bad.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="safeusb"):
        watch.scan()
    assert "2-2.json is garbled" in caplog.text and bad.exists()


# --- the event thread ----------------------------------------------------------------------

class FakeSource:
    def __init__(self) -> None:
        self.events: queue.SimpleQueue[UEvent] = queue.SimpleQueue()
        self.closed = False

    def poll(self, timeout: float | None) -> UEvent | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def loop(host: Host) -> Iterator[tuple[EventLoop, FakeSource]]:
    source = FakeSource()
    lp = EventLoop(host.handed_over(), source, settle=0.01, follow_up=(0.01, 0.02),
                   recheck=0.05)
    lp.start()
    yield lp, source
    lp.stop()
    assert source.closed and not lp.thread.is_alive()


def until(check: object, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"not within {HANG} s: {what}")
        time.sleep(0.01)


def test_a_new_device_is_looked_at_again_until_qemu_opens_it(host: Host) -> None:
    """QEMU opening the node makes no uevent, and a paused guest claims nothing: the
    follow-up looks after a prepare see the device held without any event (the periodic
    look is an hour away here)."""
    source = FakeSource()
    lp = EventLoop(host.handed_over(), source, settle=0.01, follow_up=(0.05,) * 200,
                   recheck=3600)
    lp.start()
    try:
        until(lambda: KEY in lp.watch.tracked, "the record followed from the first scan")
        assert lp.watch.tracked[KEY].phase == events.WAITING
        host.open_by = [(401, "qemu-system-x86")]
        until(lambda: lp.watch.tracked[KEY].phase == events.HELD, "held, with no uevent")
    finally:
        lp.stop()


def test_uevents_drive_the_give_back(host: Host, loop: tuple[EventLoop, FakeSource]) -> None:
    lp, source = loop
    until(lambda: KEY in lp.watch.tracked, "the record followed from the first scan")
    host.driver("usbfs")
    host.open_by = [(401, "qemu-system-x86")]
    source.events.put(UEvent("bind", str(host.path / "2-1:1.0"), "usbfs"))
    until(lambda: lp.watch.tracked[KEY].phase == events.HELD, "held after the bind")
    host.driver(None)
    source.events.put(UEvent("unbind", str(host.path / "2-1:1.0"), None))
    scans = lp.scans
    until(lambda: lp.scans >= scans + 2, "follow-up scans while the node is open")
    assert host.given == []
    host.open_by = []  # closed without a uevent: a follow-up or the recheck sees it
    until(lambda: host.given == [KEY], "given back once the node closed")


def test_a_poke_scans(host: Host, loop: tuple[EventLoop, FakeSource]) -> None:
    lp, _ = loop
    until(lambda: KEY in lp.watch.tracked, "followed")
    lp.watch.domain_stopped("g1")
    lp.poke("domain g1 stopped")
    until(lambda: host.given == [KEY], "given back after the poke")


# --- the real host's pieces ----------------------------------------------------------------

def test_node_holders_finds_this_process_by_device_number() -> None:
    st = os.stat("/dev/null")
    dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    with open("/dev/null", "rb"):
        assert (os.getpid(), open(f"/proc/{os.getpid()}/comm").read().strip()) in \
            node_holders(Roots.host(), dev)
    assert node_holders(Roots.host(), "nonsense") == []


def test_udevd_running_means_its_control_socket(tmp_path: Path) -> None:
    path = tmp_path / "control"
    assert not events.udevd_running(str(path))
    path.write_text("")
    assert not events.udevd_running(str(path))
    path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    try:
        assert events.udevd_running(str(path))
    finally:
        s.close()


def test_pyudev_source_reads_the_kernel_when_no_udevd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "udevd_running", lambda: False)
    try:
        src = events.PyudevSource()
    except OSError as exc:  # a sandbox without netlink
        pytest.skip(f"no netlink uevent socket here: {exc}")
    assert src.source == "kernel"
    assert src.poll(0.01) is None or isinstance(src.poll(0.01), UEvent)
    src.close()


def test_start_without_uevents_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise OSError("netlink is not allowed")

    monkeypatch.setattr(events, "PyudevSource", broken)
    with caplog.at_level(logging.WARNING, logger="safeusb"):
        assert events.start(Roots.host(), str(tmp_path / "st"), str(tmp_path / "p")) is None
    assert "cannot read uevents (netlink is not allowed)" in caplog.text
    assert "run `safeusb release`" in caplog.text


def test_the_loop_survives_a_failing_scan(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    class Boom(HandoverWatch):
        def scan(self) -> bool:
            raise RuntimeError("boom")

    boom = Boom(host.fs.roots, host.state, host.give_back)
    lp = EventLoop(boom, FakeSource(), settle=0.01, recheck=0.01)
    with caplog.at_level(logging.ERROR, logger="safeusb"):
        lp.start()
        until(lambda: lp.scans >= 1, "a scan")
        lp.poke("again")
        until(lambda: lp.scans >= 2, "another scan after the failure")
        lp.stop()
    assert "internal error following handed-over devices" in caplog.text


# --- a device prepared on a kernel guard refusal (journal.Record.after_refusal) -----------

def test_paused_domain_holding_the_node_unclaimed_gets_it_given_back(host: Host) -> None:
    """An ordinary record (hook, gate, CLI, auto-attach): a domain that holds the node
    without claiming an interface (paused, its firmware never configured the device) has
    it; `virsh detach-device` (QEMU closes the node) gives it back."""
    watch = host.handed_over()
    host.open_by = [(401, "qemu-system-x86")]
    watch.scan()
    assert watch.tracked[KEY].phase == events.HELD
    host.open_by = []
    watch.scan()
    assert host.given == [KEY] and host.state.load(KEY) is None


def test_refused_qemu_closing_its_dead_device_gives_nothing_back(host: Host) -> None:
    """Prepared on a guard refusal of g1's QEMU, which goes on with a dead device and the
    node open, nothing claimed: not taken. Detaching that dead device (QEMU closes the
    node) gives nothing back, so the next attach finds the device free; that attach
    claims it, and its detach gives it back."""
    watch = host.handed_over(after_refusal=True)
    host.open_by = [(401, "qemu-system-x86")]
    watch.scan()
    assert watch.tracked[KEY].phase == events.WAITING
    host.open_by = []  # virsh detach-device of the dead device
    watch.scan()
    watch.scan()
    assert host.given == [] and host.state.load(KEY) is not None
    host.open_by = [(401, "qemu-system-x86")]  # attached again: QEMU claims it
    host.driver("usbfs")
    watch.scan()
    assert watch.tracked[KEY].phase == events.HELD and host.given == []
    host.driver(None)  # a reset: the node open alone keeps it held
    assert watch.scan() is True and host.given == []
    assert watch.tracked[KEY].phase == events.HELD
    host.open_by = []
    watch.scan()
    assert host.given == [KEY] and host.state.load(KEY) is None


def test_refused_program_without_a_domain_takes_it_only_by_a_claim(
        host: Host, caplog: pytest.LogCaptureFixture) -> None:
    """QEMU started directly (no domain): the refused one keeps the node open with a dead
    device and then stops; the device stays handed over. The next QEMU claims it (logged),
    and stopping that one gives it back."""
    watch = host.handed_over(domain=None, after_refusal=True)
    host.open_by = [(900, "qemu-system-x86")]
    watch.scan()
    assert watch.tracked[KEY].phase == events.WAITING
    host.open_by = []
    watch.scan()
    assert host.given == [] and host.state.load(KEY) is not None
    host.open_by = [(901, "qemu-system-x86")]
    host.driver("usbfs")
    with caplog.at_level(logging.INFO, logger="safeusb"):
        watch.scan()
    assert watch.tracked[KEY].phase == events.HELD
    assert "safeusbd: 2-1 is taken by its guest" in caplog.text
    host.driver(None)
    host.open_by = []
    watch.scan()
    assert host.given == [KEY]


def test_refused_device_still_given_back_when_its_domain_stops(host: Host) -> None:
    """Never claimed, but its domain stopped (libvirt's event): given back, as any
    record."""
    watch = host.handed_over(after_refusal=True)
    host.open_by = [(401, "qemu-system-x86")]
    watch.scan()
    host.open_by = []
    watch.domain_stopped("g1")
    watch.scan()
    assert host.given == [KEY]


def test_the_record_keeps_the_refusal_mark(tmp_path: Path) -> None:
    """after_refusal survives the journal; an old record without it is an ordinary one;
    anything but true or false there makes the record untrusted."""
    state = StateDir(str(tmp_path / "state"))
    state.save(new_record(KEY, "g1", [HANDOFF], True, after_refusal=True))
    loaded = state.load(KEY)
    assert loaded is not None and loaded.after_refusal
    doc = loaded.as_json()
    del doc["after_refusal"]
    assert not Record.from_json(doc).after_refusal
    assert "after_refusal" not in new_record(KEY, None, [], True).as_json()
    with pytest.raises(ValueError, match="after_refusal"):
        Record.from_json({**doc, "after_refusal": "yes"})


def test_the_device_tree_is_read_ahead_once_the_uevents_settle(host: Host) -> None:
    """The keep callback (safeusbd: server.keep_devices) runs once the kernel's uevent
    count has stood for a settle, at the start and after each change of it, whatever the
    subsystem of the uevents (the count is the kernel's, not the USB monitor's)."""
    count = host.fs.sys / "kernel" / "uevent_seqnum"
    count.parent.mkdir(parents=True, exist_ok=True)
    count.write_text("100\n")
    kept: list[str] = []
    lp = EventLoop(host.watch(), FakeSource(), settle=0.05, recheck=3600,
                   keep=lambda: kept.append(count.read_text().strip()))
    lp.start()
    try:
        until(lambda: kept == ["100"], "read ahead at the start")
        time.sleep(0.2)
        assert kept == ["100"]  # once while nothing happens
        count.write_text("107\n")  # a disk came: block uevents, no USB one
        until(lambda: kept == ["100", "107"], "read ahead again after the change")
    finally:
        lp.stop()


def test_keep_devices_reads_what_a_decision_reads(host: Host) -> None:
    count = host.fs.sys / "kernel" / "uevent_seqnum"
    count.parent.mkdir(parents=True, exist_ok=True)
    count.write_text("5\n")
    roots = host.fs.roots
    keep_devices(roots)
    target = usb_at(roots, 2, 3)
    assert target.syspath == str(host.path) and target.usb.sysname == KEY
    assert roots.read_quietly(("usb", 2, 3), lambda: pytest.fail("read again"))[1]
    assert keep_device(roots, target)[1]  # the walk and the block devices too
    count.write_text("6\n")
    assert not keep_device(roots, target)[1]
