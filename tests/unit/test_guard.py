"""The kernel guard's user-space side on fakes: what the kernel's events decode to, what the
service does with a refusal, how availability and state are told. The program itself is
proven on the real kernel (tests/vm/test_guard_vm.py)."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from safeusb.host import guard
from safeusb.host.journal import StateDir
from safeusb.safeusbd.peer import MachineScope
from safeusb.safeusbd.protocol import DeviceArgs
from safeusb.safeusbd.server import (
    CLOCK_TICKS,
    Done,
    prepare_on_refusal,
    refused_domain,
    still_refused,
)


def event(**kw: object) -> bytes:
    e = guard._Event()
    for k, v in kw.items():
        setattr(e, k, v)
    return bytes(e)


def test_event_layout_matches_the_c_struct() -> None:
    # struct guard_event in safeusb/bpf/guard.bpf.c: 8 + 7*4 + 2*2 + 16 + 32 + 32 + 64 + 32 + 8
    assert ctypes.sizeof(guard._Event) == 224
    assert guard._Event.written.offset == 184
    assert guard._Event.start_time.offset == 216
    src = (Path(guard.__file__).parent.parent / "bpf" / "guard.bpf.c").read_text()
    body = src.split("struct guard_event {", 1)[1].split("};", 1)[0]
    c_fields = [line.split(";")[0].split()[-1].split("[")[0] for line in body.splitlines()
                if ";" in line]
    assert c_fields == [f[0] for f in guard._Event._fields_]


def test_refusal_from_a_usbfs_event() -> None:
    r = guard.Refusal.from_bytes(event(
        device_id=1234, pid=77, tid=78, uid=0, kind=1, ifnum=0, busnum=2, devnum=3,
        vendor=0x46F4, product=0x0001, comm=b"usbredirect", port=b"2-1",
        driver=b"usb-storage", serial=b"STICK1"))
    assert (r.pid, r.comm, r.uid, r.port, r.vendor_product, r.serial, r.driver) == (
        77, "usbredirect", 0, "2-1", "46f4:0001", "STICK1", "usb-storage")
    assert r.kind == "usbfs USBDEVFS_DISCONNECT"
    assert r.describe() == ("pid 77 (usbredirect, uid 0) tried to detach usb-storage from "
                            "2-1 (46f4:0001 serial STICK1) through usbfs "
                            "USBDEVFS_DISCONNECT: refused")


def test_refusal_from_a_driver_unbind_file_names_what_was_written() -> None:
    r = guard.Refusal.from_bytes(event(pid=5, kind=3, ifnum=-1, comm=b"bash",
                                       driver=b"usb-storage", written=b"2-1.4:1.0\n"))
    assert (r.port, r.interface, r.kind, r.device_id) == ("2-1.4", "2-1.4:1.0",
                                                          "sysfs unbind", 0)


@pytest.fixture
def fake_sys(tmp_path: Path) -> Path:
    (tmp_path / "bus/usb/devices/2-1").mkdir(parents=True)
    return tmp_path


def _handle(fake_sys: Path, tmp_path: Path, r: guard.Refusal,
            prepare_says: tuple[bool, str] = (True, "hold /dev/sda; unbind usb-storage"),
            taken: bool = False,
            domain_of: Callable[[guard.Refusal], str | None] | None = None,
            ) -> tuple[str, list[str]]:
    asked: list[str] = []

    def prepare(port: str, domain: str | None) -> tuple[bool, str]:
        asked.append(port if domain is None else f"{port} for {domain}")
        return prepare_says

    log = guard.RefusalLog(str(tmp_path / "state"))
    out = guard.handle_refusal(r, prepare, log, lambda _p: taken, sys_root=str(fake_sys),
                               domain_of=domain_of)
    assert log.read()[-1]["outcome"] == out
    return out, asked


def _refusal(port: str, device_id: int) -> guard.Refusal:
    return guard.Refusal(0.0, 9, "qemu-system-x86", 64055, "usbfs USBDEVFS_DISCONNECT",
                         "usb-storage", port, "", "46f4:0001", "S", device_id)


def test_idle_device_is_prepared_and_the_user_told(fake_sys: Path, tmp_path: Path) -> None:
    ino = os.stat(fake_sys / "bus/usb/devices/2-1").st_ino
    out, asked = _handle(fake_sys, tmp_path, _refusal("2-1", ino))
    assert asked == ["2-1"]
    assert out.startswith("2-1 was idle: prepared by the policy") and "release 2-1" in out


def test_idle_device_refused_an_unbind_is_unbound_now(fake_sys: Path,
                                                     tmp_path: Path) -> None:
    """The sysfs unbind: the prepare did what it asked, and a second write is refused as
    the first was, so the log does not promise that the next attempt passes."""
    r = guard.Refusal(0.0, 9, "bash", 0, "sysfs unbind", "usb-storage", "2-1", "2-1:1.0",
                      "", "", 0)
    out, asked = _handle(fake_sys, tmp_path, r)
    assert asked == ["2-1"]
    assert out.startswith("2-1 was idle: prepared by the policy") and \
        "usb-storage is unbound from it now, as asked" in out and "next attempt" not in out


def test_busy_device_stays_with_the_reason(fake_sys: Path, tmp_path: Path) -> None:
    ino = os.stat(fake_sys / "bus/usb/devices/2-1").st_ino
    out, _ = _handle(fake_sys, tmp_path, _refusal("2-1", ino),
                     prepare_says=(False, "/dev/sda mounted at /mnt"))
    assert out == "2-1 stays with the host: /dev/sda mounted at /mnt"


def test_another_device_at_the_same_port_is_not_prepared(fake_sys: Path,
                                                         tmp_path: Path) -> None:
    ino = os.stat(fake_sys / "bus/usb/devices/2-1").st_ino
    out, asked = _handle(fake_sys, tmp_path, _refusal("2-1", ino + 1))
    assert asked == [] and "no longer the device" in out


def test_device_already_taken_is_left(fake_sys: Path, tmp_path: Path) -> None:
    ino = os.stat(fake_sys / "bus/usb/devices/2-1").st_ino
    out, asked = _handle(fake_sys, tmp_path, _refusal("2-1", ino), taken=True)
    assert asked == [] and "already taken" in out


@pytest.mark.parametrize("port", ["", "../2-1", ".."])
def test_unknown_or_odd_port_is_never_prepared(fake_sys: Path, tmp_path: Path,
                                               port: str) -> None:
    out, asked = _handle(fake_sys, tmp_path, _refusal(port, 0))
    assert asked == []
    assert "nothing prepared" in out


def test_refusal_log_keeps_the_last(tmp_path: Path) -> None:
    log = guard.RefusalLog(str(tmp_path))
    for i in range(guard.KEEP_REFUSALS + 5):
        log.add(_refusal(f"2-{i}", i))
    items = log.read()
    assert len(items) == guard.KEEP_REFUSALS and items[-1]["port"] == f"2-{guard.KEEP_REFUSALS + 4}"
    (tmp_path / guard.REFUSALS_FILE).write_text("{garbled")
    assert log.read() == []


def test_availability_without_bpf_lsm_names_the_boot_parameter(tmp_path: Path) -> None:
    (tmp_path / "kernel/security").mkdir(parents=True)
    (tmp_path / "kernel/security/lsm").write_text("lockdown,capability,yama,apparmor")
    a = guard.availability(str(tmp_path))
    assert not a.available
    assert "BPF LSM is not active (active: lockdown,capability,yama,apparmor)" in a.reasons
    assert a.hint is not None and "lsm=lockdown,capability,yama,apparmor,bpf" in a.hint
    assert any("no BTF" in r for r in a.reasons)


def test_availability_locked_down_to_confidentiality(tmp_path: Path) -> None:
    (tmp_path / "kernel/security").mkdir(parents=True)
    (tmp_path / "kernel/btf").mkdir(parents=True)
    (tmp_path / "kernel/btf/vmlinux").write_bytes(b"")
    (tmp_path / "kernel/security/lsm").write_text("lockdown,capability,bpf")
    (tmp_path / "kernel/security/lockdown").write_text("none integrity [confidentiality]\n")
    a = guard.availability(str(tmp_path))
    assert a.hint is None
    assert any("confidentiality" in r for r in a.reasons)


def test_status_text() -> None:
    off = {"enabled": False, "available": False,
           "unavailable_because": ["BPF LSM is not active (active: lockdown,capability)"],
           "boot_parameter": "boot with lsm=lockdown,capability,bpf", "refusals": []}
    assert guard.as_text(off) == (
        "guard: not available on this kernel: BPF LSM is not active (active: "
        "lockdown,capability)\n  to enable it: boot with lsm=lockdown,capability,bpf\n")
    on = {"enabled": True, "available": True, "guarded_drivers": ["usb-storage", "uas"],
          "counters": {"refused": 3, "exempted": 1}, "reader": None,
          "refusals": [{"time": 0, "pid": 9, "comm": "usbredirect", "uid": 0,
                        "kind": "usbfs USBDEVFS_DISCONNECT", "port": "2-1",
                        "vendor_product": "46f4:0001", "serial": "S",
                        "outcome": "2-1 was idle: prepared"}]}
    text = guard.as_text(on)
    assert text.startswith("guard: on: detaching usb-storage, uas is refused unless safeusb "
                           "hands the device over (3 refused, 1 let through for safeusb)")
    assert "safeusbd is not running" in text
    assert "pid 9 (usbredirect, uid 0) usbfs USBDEVFS_DISCONNECT of 2-1 46f4:0001 serial S: " \
        "refused: 2-1 was idle: prepared" in text
    on["refusals"][0].update(domain="g1", comm="qemu-system-x86", uid=64055)
    on["handed_over"] = 1
    text = guard.as_text(on)
    assert "pid 9 (qemu-system-x86, uid 64055, QEMU of domain g1) usbfs " \
        "USBDEVFS_DISCONNECT of 2-1 46f4:0001 serial S: refused to domain g1: 2-1 was idle" \
        in text
    assert "1 device(s) handed over by safeusb: binding usb-storage, uas (bind, new_id, " \
        "drivers_probe) is refused" in text


def test_handover_without_the_guard_does_nothing(tmp_path: Path) -> None:
    with guard.handover(str(tmp_path / "no-guard")):
        pass


def test_refusal_names_the_domain_libvirt_confirms(fake_sys: Path, tmp_path: Path) -> None:
    ino = os.stat(fake_sys / "bus/usb/devices/2-1").st_ino
    r = _refusal("2-1", ino)
    _, asked = _handle(fake_sys, tmp_path, r, prepare_says=(False, "/dev/sda mounted"),
                       domain_of=lambda _r: "g1")
    assert asked == ["2-1 for g1"] and r.domain == "g1"
    assert r.describe().startswith("pid 9 (qemu-system-x86, uid 64055, QEMU of domain g1) "
                                   "tried to detach usb-storage from 2-1")
    assert guard.RefusalLog(str(tmp_path / "state")).read()[-1]["domain"] == "g1"


def test_a_domain_that_cannot_be_told_leaves_the_refusal_standing(fake_sys: Path,
                                                                  tmp_path: Path) -> None:
    def broken(_r: guard.Refusal) -> str | None:
        raise RuntimeError("libvirt went away")

    ino = os.stat(fake_sys / "bus/usb/devices/2-1").st_ino
    r = _refusal("2-1", ino)
    out, asked = _handle(fake_sys, tmp_path, r, domain_of=broken)
    assert asked == ["2-1"] and r.domain == "" and "was idle" in out


@pytest.mark.parametrize(("kind", "written", "what"), [
    (7, b"2-1:1.0\n", "sysfs bind"), (9, b"2-1:1.0", "sysfs drivers_probe")])
def test_a_bind_refused_while_handed_over(fake_sys: Path, tmp_path: Path, kind: int,
                                          written: bytes, what: str) -> None:
    r = guard.Refusal.from_bytes(event(pid=5, kind=kind, ifnum=-1, comm=b"bash",
                                       driver=b"usb-storage" if kind == 7 else b"",
                                       written=written, start_time=123))
    assert (r.binding, r.interface, r.port, r.kind, r.start_time) == (
        True, "2-1:1.0", "2-1", what, 123)
    assert "tried to bind" in r.describe() and "handed over: refused" in r.describe()
    out, asked = _handle(fake_sys, tmp_path, r)
    assert asked == [] and "safeusb release" in out


def _connect(fake_sys: Path, pid: int = 607, at: float = 1000.0) -> guard.Refusal:
    """QEMU's usbfs CONNECT of a handed-over device (libusb_attach_kernel_driver as it
    closes a dead device): refused."""
    ino = os.stat(fake_sys / "bus/usb/devices/2-1").st_ino
    return guard.Refusal(at, pid, "qemu-system-x86", 64055, "usbfs USBDEVFS_CONNECT", "",
                         "2-1", "", "46f4:0001", "S", ino, start_time=55, binding=True)


def test_repeats_of_one_refusal_are_one_line_with_a_count(
        fake_sys: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """QEMU asks CONNECT dozens of times as it closes a dead device: the first is logged
    and kept; the repeats within REPEAT_WINDOW of the last are counted on it, and told in
    one line once they stop; `safeusb status` shows the count, and the refusals before
    stay among the last kept."""
    log = guard.RefusalLog(str(tmp_path / "state"))
    log.add(_refusal("2-1", 1))  # a refusal that must stay in view
    with caplog.at_level(logging.DEBUG, logger="safeusb"):
        for i in range(59):
            guard.handle_refusal(_connect(fake_sys, at=1000.0 + i * 0.5), lambda *_: (True, ""),
                                 log, lambda _p: True, sys_root=str(fake_sys))
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert len(warned) == 2 and "USBDEVFS_CONNECT" in warned[0], warned
    items = log.read()
    assert len(items) == 2 and items[0]["kind"] == "usbfs USBDEVFS_DISCONNECT"
    assert items[1]["count"] == 59 and items[1]["last"] == 1000.0 + 58 * 0.5
    last = 1000.0 + 58 * 0.5
    assert log.due(last + guard.REPEAT_WINDOW - 1) == []  # may go on still
    lines = log.due(last + guard.REPEAT_WINDOW)
    assert len(lines) == 1 and lines[0].startswith("pid 607 (qemu-system-x86, uid 64055) "
                                                   "tried to bind")
    assert lines[0].endswith("again 58 more times within 28 s")
    assert log.due(last + 100) == []  # told once
    text = guard.as_text({"enabled": False, "available": True, "refusals": items},
                         refusals=2)
    assert "USBDEVFS_CONNECT of 2-1 46f4:0001 serial S: refused (59 times, the last at " \
        in text and "USBDEVFS_DISCONNECT of 2-1" in text


def test_a_refusal_is_a_repeat_only_of_the_same_process_device_door_and_outcome(
        fake_sys: Path, tmp_path: Path) -> None:
    log = guard.RefusalLog(str(tmp_path / "state"))

    def handle(r: guard.Refusal, taken: bool = True) -> None:
        guard.handle_refusal(r, lambda *_: (True, "unbind usb-storage"), log,
                             lambda _p: taken, sys_root=str(fake_sys))

    handle(_connect(fake_sys))
    handle(_connect(fake_sys, pid=608, at=1001.0))  # another process
    other_door = _connect(fake_sys, at=1002.0)
    other_door.kind = "sysfs bind"
    handle(other_door)
    restarted = _connect(fake_sys, at=1003.0)
    restarted.start_time = 56  # the same pid, another process
    handle(restarted)
    handle(_connect(fake_sys, at=1003.0 + guard.REPEAT_WINDOW + 1))  # too late after it
    assert [i["count"] for i in log.read()] == [1, 1, 1, 1, 1]
    # the same detach refused again: first prepared, then already taken (another outcome)
    ino = os.stat(fake_sys / "bus/usb/devices/2-1").st_ino
    handle(replace(_refusal("2-1", ino), time=2000.0), taken=False)
    handle(replace(_refusal("2-1", ino), time=2001.0))
    handle(replace(_refusal("2-1", ino), time=2002.0))
    items = log.read()[-2:]
    assert [(i["count"], i["outcome"].split(":")[0]) for i in items] == [
        (1, "2-1 was idle"), (2, "2-1 is already taken by safeusb")]
    assert len(log.due(3000.0)) == 1


def test_new_id_text_is_not_taken_for_an_interface() -> None:
    r = guard.Refusal.from_bytes(event(pid=5, kind=8, ifnum=-1, comm=b"sh",
                                       driver=b"usb-storage", written=b"46f4 0001\n"))
    assert (r.binding, r.interface, r.port, r.kind) == (True, "", "", "sysfs new_id")


def _fake_proc(tmp_path: Path, pid: int, cgroup: str, start_ticks: int) -> Path:
    proc = tmp_path / "proc"
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_text(cgroup)
    fields = ["S"] + ["0"] * 18 + [str(start_ticks)] + ["0"] * 10
    (proc / str(pid) / "stat").write_text(f"{pid} (qemu-system-x86) " + " ".join(fields))
    return proc


SCOPE = "0::/machine/qemu-1-g1.libvirt-qemu/emulator\n"


def test_refused_domain_from_the_cgroup_confirmed_by_libvirt(tmp_path: Path) -> None:
    start_ns = 5 * 10**9 + 1234
    proc = _fake_proc(tmp_path, 77, SCOPE, start_ns * CLOCK_TICKS // 10**9)
    seen: list[MachineScope] = []

    def resolve(scope: MachineScope) -> tuple[str | None, str]:
        seen.append(scope)
        return "g1", "domain g1"

    assert refused_domain(77, start_ns, resolve, str(proc)) == ("g1", "domain g1")
    assert seen[0].domain_id == 1 and seen[0].path == "/machine/qemu-1-g1.libvirt-qemu"


def test_refused_domain_never_for_another_process_or_outside_a_scope(tmp_path: Path) -> None:
    def resolve(_scope: object) -> tuple[str | None, str]:
        return "g1", "domain g1"

    start_ns = 5 * 10**9
    proc = _fake_proc(tmp_path, 77, SCOPE, start_ns * CLOCK_TICKS // 10**9 + 1)
    name, why = refused_domain(77, start_ns, resolve, str(proc))  # the pid was reused
    assert name is None and "no longer the process" in why
    proc = _fake_proc(tmp_path / "b", 78, "0::/user.slice\n", start_ns * CLOCK_TICKS // 10**9)
    name, why = refused_domain(78, start_ns, resolve, str(proc))
    assert name is None and "no libvirt QEMU domain" in why
    assert refused_domain(79, start_ns, resolve, str(proc))[0] is None  # gone


def test_prepare_leaves_out_only_the_process_still_the_one_refused(tmp_path: Path) -> None:
    """The refused process's hold on the usbfs node is left out of prepare's judgement
    only while the pid is still that process (its start time); a pid reused, gone or
    without a start time leaves nothing out."""
    start_ns = 5 * 10**9
    r = _refusal("2-1", 1)
    r.pid, r.start_time = 77, start_ns
    proc = _fake_proc(tmp_path, 77, SCOPE, start_ns * CLOCK_TICKS // 10**9)
    assert still_refused(r, str(proc)) == 77
    reused = _fake_proc(tmp_path / "b", 77, SCOPE, start_ns * CLOCK_TICKS // 10**9 + 1)
    assert still_refused(r, str(reused)) is None
    assert still_refused(r, str(tmp_path / "empty")) is None  # gone
    r.start_time = 0
    assert still_refused(r, str(proc)) is None


class _Actions:
    """safeusbd's DeviceActions as prepare_on_refusal uses them: what it was asked."""

    def __init__(self, done: Done) -> None:
        self.done = done
        self.asked: list[tuple[str | None, str | None, bool, int | None]] = []

    def prepare(self, args: DeviceArgs, cancel: threading.Event,
                after_refusal: bool = False, requester: int | None = None) -> Done:
        self.asked.append((args.selector, args.domain, after_refusal, requester))
        return self.done


def test_prepare_on_a_refusal_marks_it_and_names_the_process(tmp_path: Path) -> None:
    """safeusbd's prepare on a refusal asks for the record's after_refusal mark, and names
    the refused process only while it is still the one refused."""
    start_ns = 5 * 10**9
    r = _refusal("2-1", 1)
    r.pid, r.start_time = 77, start_ns
    proc = _fake_proc(tmp_path, 77, SCOPE, start_ns * CLOCK_TICKS // 10**9)
    actions = _Actions(Done(True, {"done": ["unbind usb-storage from 2-1:1.0"]}))
    assert prepare_on_refusal(actions, "2-1", "g1", r, str(proc)) == (
        True, "unbind usb-storage from 2-1:1.0")
    assert actions.asked == [("2-1", "g1", True, 77)]
    r.start_time += 10**9  # the pid is another process now
    refused = _Actions(Done(False, {}, "refused", "2-1 stays: /dev/sda mounted"))
    assert prepare_on_refusal(refused, "2-1", None, r, str(proc)) == (
        False, "2-1 stays: /dev/sda mounted")
    assert refused.asked == [("2-1", None, True, None)]


def test_refusal_log_is_no_device_record(tmp_path: Path) -> None:
    guard.RefusalLog(str(tmp_path)).add(_refusal("2-1", 1))
    assert StateDir(str(tmp_path)).keys() == ([], [])
