"""safeusbd's attach_to (safeusb.safeusbd.autoattach) on built sysfs trees, with fake libvirt,
prepare and clock; the real kernel is in tests/vm/test_events_vm.py (autoattach)."""

from __future__ import annotations

import logging
import queue
import time
from pathlib import Path

import pytest

from safeusb.errors import SafeUSBError
from safeusb.handover.policy import Policy
from safeusb.host.journal import StateDir
from safeusb.safeusbd.autoattach import AutoAttach, hostdev_xml
from safeusb.safeusbd.events import EventLoop, HandoverWatch, UEvent
from tests.unit.fakesys import FakeSystem

KEY = "2-1"
RULE = '[[rules]]\nname = "stick"\nvendor_product = "46f4:0001"\nattach_to = "g1"\n'


class Fakes:
    """A stick at 2-1 (bus 2 device 3), libvirt's domains, what was prepared, attached
    and given back, and a clock."""

    def __init__(self, tmp_path: Path) -> None:
        self.fs = FakeSystem(tmp_path / "root")
        self.path = self.fs.usb_device(KEY, 0x46F4, 0x0001, busnum=2, devnum=3)
        self.policy_text = RULE
        self.running: dict[str, bool | None] = {"g1": True}
        self.refuse: list[str] = []  # prepare refuses while this has reasons (popped)
        self.refuse_always = False
        self.libvirt_error: str | None = None
        self.records: set[str] = set()
        self.calls: list[tuple[str, ...]] = []
        self.now = 100.0

    # Libvirt
    def active(self, name: str) -> bool | None:
        return self.running.get(name, False)

    def attach(self, name: str, xml: str) -> None:
        self.calls.append(("attach", name, xml))
        if self.libvirt_error:
            raise SafeUSBError(self.libvirt_error)

    # Handover
    def prepare(self, key: str, domain: str) -> tuple[bool, list[str]]:
        self.calls.append(("prepare", key, domain))
        if self.refuse_always:
            return False, ["/dev/sda mounted at /media/sda"]
        if self.refuse:
            return False, [self.refuse.pop(0)]
        self.records.add(key)
        return True, ["hold /dev/sda; unbind usb-storage from 2-1:1.0"]

    def give_back(self, key: str, domain: str) -> list[str]:
        self.calls.append(("give_back", key, domain))
        self.records.discard(key)
        return ["bind usb-storage to 2-1:1.0"]

    def clock(self) -> float:
        return self.now

    def auto(self) -> AutoAttach:
        return AutoAttach(self.fs.roots, lambda: Policy.from_text(self.policy_text, "p.toml"),
                          self, self, has_record=lambda key: key in self.records,
                          clock=self.clock, settle_max=5.0, retries=(1.0, 2.0))

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]

    def unbind(self) -> None:
        (self.path / f"{KEY}:1.0" / "driver").unlink()

    def replug(self, devnum: int) -> None:
        """The stick at the same port with a new device number (a new usbfs node)."""
        (self.path / "devnum").write_text(f"{devnum}\n")
        (self.path / "dev").write_text(f"189:{128 + devnum - 1}\n")


@pytest.fixture
def f(tmp_path: Path) -> Fakes:
    return Fakes(tmp_path)


def test_a_matching_device_goes_to_the_running_domain(f: Fakes,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    auto = f.auto()
    caplog.set_level(logging.INFO, "safeusb")
    auto.added(str(f.path))
    assert auto.scan() is False
    assert f.calls == [("prepare", KEY, "g1"), ("attach", "g1", hostdev_xml(2, 3))]
    assert auto.attached == {KEY: "g1"} and not auto.waiting and not auto.arrivals
    text = caplog.text
    assert "2-1 (46f4:0001 serial STICK1) arrived; rule 'stick' hands it to domain g1" in text
    assert "2-1 attached to domain g1 (bus 2 device 3, rule 'stick')" in text


def test_hostdev_xml_names_bus_and_device() -> None:
    assert hostdev_xml(2, 13) == ("<hostdev mode='subsystem' type='usb'><source><address "
                                  "bus='2' device='13'/></source></hostdev>")


def test_a_device_no_rule_matches_is_left_alone(f: Fakes) -> None:
    f.policy_text = RULE.replace("46f4:0001", "1234:5678")
    auto = f.auto()
    auto.added(str(f.path))
    auto.scan()
    assert f.calls == [] and not auto.waiting


def test_rules_without_attach_to_do_not_stand_in_the_way(f: Fakes) -> None:
    f.policy_text = '[[rules]]\nvendor_product = "46f4:0001"\nmount = "unmount"\n\n' + RULE
    auto = f.auto()
    auto.added(str(f.path))
    auto.scan()
    assert f.kinds() == ["prepare", "attach"]


def test_interfaces_are_not_devices(f: Fakes) -> None:
    auto = f.auto()
    auto.added(str(f.path / f"{KEY}:1.0"))
    assert not auto.arrivals


def test_domain_not_running_waits_then_attaches_when_it_starts(
        f: Fakes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "safeusb")
    f.running["g1"] = False
    auto = f.auto()
    auto.added(str(f.path))
    auto.scan()
    assert f.calls == [] and auto.waiting[KEY].domain == "g1"
    assert "2-1 stays on the host (domain g1 not running)" in caplog.text
    auto.domain_started("g2")
    auto.scan()
    assert f.calls == []
    f.running["g1"] = True
    auto.domain_started("g1")
    auto.scan()
    assert f.kinds() == ["prepare", "attach"] and not auto.waiting
    assert "domain g1 started; handing it 2-1" in caplog.text


def test_libvirt_that_cannot_say_means_waiting(f: Fakes) -> None:
    f.running["g1"] = None
    auto = f.auto()
    auto.added(str(f.path))
    auto.scan()
    assert f.calls == [] and "cannot say" in auto.waiting[KEY].why


def test_at_a_start_every_matching_device_on_the_host_goes(f: Fakes) -> None:
    """Not only those that waited: one plugged in again meanwhile, one present since
    before the rule; not one taken already, nor one a rule hands to another domain."""
    f.running["g1"] = False
    f.policy_text = RULE + ('\n[[rules]]\nname = "other"\nserial = "S5"\n'
                            'attach_to = "g2"\n')
    auto = f.auto()
    auto.added(str(f.path))
    auto.scan()
    f.replug(9)  # another device number at the port
    f.fs.usb_device("2-2", 0x46F4, 0x0001, busnum=2, devnum=4, serial="S2")  # no arrival
    f.fs.usb_device("2-4", 0x46F4, 0x0001, busnum=2, devnum=6, serial="S4")
    f.records.add("2-4")  # taken by someone already
    f.fs.usb_device("2-5", 0x1234, 0x5678, busnum=2, devnum=7, serial="S5")  # for g2
    f.running["g1"] = True
    auto.domain_started("g1")
    auto.scan()
    assert [c for c in f.calls if c[0] == "attach"] == [
        ("attach", "g1", hostdev_xml(2, 9)), ("attach", "g1", hostdev_xml(2, 4))]
    assert [c[1] for c in f.calls if c[0] == "prepare"] == [KEY, "2-2"]
    assert not auto.waiting


def test_a_device_settles_before_it_is_decided(f: Fakes) -> None:
    f.unbind()  # usb-storage not bound yet
    auto = f.auto()
    auto.added(str(f.path))
    assert auto.scan() is True and f.calls == []
    f.now += 5.0  # no driver came: decided anyway
    assert auto.scan() is False
    assert f.kinds() == ["prepare", "attach"]


def test_a_refused_arrival_is_tried_again_then_stays(f: Fakes,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "safeusb")
    f.refuse_always = True
    auto = f.auto()
    auto.added(str(f.path))
    assert auto.scan() is True  # again in 1 s
    assert auto.scan() is True and f.kinds() == ["prepare"]  # not yet due
    f.now += 1.0
    assert auto.scan() is True and f.kinds() == ["prepare", "prepare"]
    f.now += 2.0
    assert auto.scan() is False
    assert f.kinds() == ["prepare"] * 3 and "attach" not in f.kinds()
    assert "NOT handed to domain g1, it stays on the host: /dev/sda mounted" in caplog.text
    assert auto.waiting[KEY].why.startswith("refused: ")


def test_a_passing_refusal_is_overcome(f: Fakes) -> None:
    f.refuse = ["pid 90 (systemd-udevd) has /dev/sda open"]
    auto = f.auto()
    auto.added(str(f.path))
    assert auto.scan() is True
    f.now += 1.0
    assert auto.scan() is False
    assert f.kinds() == ["prepare", "prepare", "attach"]


def test_libvirt_failing_gives_the_device_back(f: Fakes,
                                               caplog: pytest.LogCaptureFixture) -> None:
    f.libvirt_error = "libvirt: Requested operation is not valid: domain is not running"
    auto = f.auto()
    auto.added(str(f.path))
    auto.scan()
    assert f.kinds() == ["prepare", "attach", "give_back"] and KEY not in f.records
    assert "libvirt did not attach 2-1 to domain g1" in caplog.text
    assert KEY in auto.waiting  # it goes at the domain's next start


def test_a_device_already_taken_is_left_alone(f: Fakes) -> None:
    f.records.add(KEY)
    auto = f.auto()
    auto.added(str(f.path))
    auto.scan()
    assert f.calls == []


def test_a_policy_that_cannot_be_read_keeps_the_device_on_the_host(
        f: Fakes, caplog: pytest.LogCaptureFixture) -> None:
    f.policy_text = "[[rules]\n"
    auto = f.auto()
    auto.added(str(f.path))
    auto.scan()
    assert f.calls == [] and "the policy cannot be used" in caplog.text


def test_given_back_waits_for_the_next_start_not_attached_at_once(f: Fakes) -> None:
    """A detach from the running domain stays a detach."""
    auto = f.auto()
    auto.returned(KEY)
    auto.scan()
    assert f.calls == [] and "given back by domain g1" in auto.waiting[KEY].why
    auto.domain_started("g1")
    auto.scan()
    assert f.kinds() == ["prepare", "attach"]


def test_a_gone_arrival_is_dropped(f: Fakes) -> None:
    auto = f.auto()
    auto.added(str(f.path.parent / "2-9"))
    assert auto.scan() is False and not auto.arrivals and f.calls == []


# --- through the event loop -----------------------------------------------------------------

class FakeSource:
    def __init__(self) -> None:
        self.events: queue.SimpleQueue[UEvent] = queue.SimpleQueue()

    def poll(self, timeout: float | None) -> UEvent | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        pass


def test_a_uevent_add_drives_the_attach(f: Fakes, tmp_path: Path) -> None:
    auto = f.auto()
    watch = HandoverWatch(f.fs.roots, StateDir(str(tmp_path / "state")),
                          lambda key, record: (True, []), holders=lambda dev: [])
    source = FakeSource()
    lp = EventLoop(watch, source, settle=0.01, follow_up=(0.01,), recheck=0.05, attach=auto)
    lp.start()
    try:
        source.events.put(UEvent("bind", str(f.path / f"{KEY}:1.0"), "usb-storage"))
        source.events.put(UEvent("add", str(f.path), None))
        deadline = time.monotonic() + 10
        while "attach" not in f.kinds():
            assert time.monotonic() < deadline, "not attached within 10 s"
            time.sleep(0.01)
    finally:
        lp.stop()
    assert f.kinds() == ["prepare", "attach"]

