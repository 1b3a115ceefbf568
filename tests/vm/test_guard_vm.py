"""The kernel guard (safeusb guard) on a real kernel: BPF LSM active, as Debian boots it.

Every door that detaches usb-storage from a mounted stick with 4 MiB unwritten is refused
with EBUSY and the stick keeps its data (images checked from outside); the same sysfs
unbind with the guard off loses the data (control); an idle stick is taken at the second
attempt, once safeusbd has prepared it on the first refusal, through usbredirect, QEMU's
usb-host and `virsh attach-device`; through sysfs unbind it ends unbound after the
first."""

from __future__ import annotations

import json
import re

import pytest

from safeusb.lab.harness import (
    MIB,
    Boot,
    BootResult,
    Image,
    Runner,
    Scenario,
    ScenarioResult,
    Stick,
    libvirt_scenario,
)

pytestmark = pytest.mark.vm

DATA = {"data.bin": 4 * MIB}

BOOT = Boot(
    name="guard",
    sticks=(
        Stick("control", Image.ext4()),
        Stick("sysfs", Image.ext4()),
        Stick("redir", Image.ext4()),
        Stick("qemu", Image.ext4()),
        Stick("lv", Image.ext4()),
        Stick("rebind", Image.ext4()),
        Stick("idle", Image.ext4()),
        Stick("idle-sysfs", Image.ext4()),
        Stick("idle-qemu", Image.ext4()),
        Stick("idle-lv", Image.ext4()),
    ),
    # libvirtd as Debian ships it and the nested domain g1, which no scenario protects
    libvirt=True,
    timeout=1800,
    scenarios=(
        Scenario("control", "guard-control.sh", payloads=DATA),
        Scenario("sysfs", "guard-sysfs.sh", payloads=DATA, timeout=180),
        Scenario("redirect", "guard-redirect.sh", payloads=DATA, timeout=180),
        Scenario("qemu", "guard-qemu.sh", payloads=DATA, timeout=240),
        Scenario("libvirt", "guard-libvirt.sh", payloads=DATA, timeout=420),
        Scenario("rebind", "guard-rebind.sh", timeout=300),
        Scenario("idle", "guard-idle.sh", timeout=300),
        # after "rebind": these leave their sticks handed over
        Scenario("idle-sysfs", "guard-idle-sysfs.sh", timeout=180),
        Scenario("idle-qemu", "guard-idle-qemu.sh", timeout=420),
        Scenario("idle-libvirt", "guard-idle-libvirt.sh", payloads=DATA, timeout=480),
    ),
)


@pytest.fixture(scope="module")
def vm(vm_runner: Runner, safeusb_cli: str) -> BootResult:
    return vm_runner.run(BOOT)


def _kept(r: ScenarioResult, vm: BootResult, stick: str, scenario: str) -> None:
    """Still mounted, its 4 MiB still unwritten, usb-storage still bound, and (after the
    VM's final sync) the image holds the file and is fsck-clean."""
    n = r.notes()
    # (ext4's journal commits may write part of the 4 MiB meanwhile; as in the other tiers,
    # at least 1 MiB must still be unwritten for the scenario to show anything)
    r.expect(int(n.get("dirty_kb") or 0) >= 1024, f"the data was not left unwritten ({n})")
    r.expect(n.get("mounted_after") == "1" and n.get("driver_after") == "usb-storage"
             and n.get("dirty_kb_after", "gone").isdigit()
             and int(n["dirty_kb_after"]) >= 1024,
             f"the stick did not stay with the host, mounted with its data unwritten ({n})")
    check = vm.check_stick(stick, {"data.bin": (scenario, "data.bin")})
    r.expect(check.intact, check.summary())


def _guard_enabled(r: ScenarioResult) -> None:
    n = r.notes()
    r.expect(n.get("enable_rc") == "0" and n.get("status_rc") == "0",
             f"the guard did not enable ({n}):\n{r.file('enable.out')}{r.file('enable.err')}"
             f"{r.file('guard-status.out')}")
    r.expect(n.get("reader", "").isdigit(), f"safeusbd does not read the refusals ({n})")


def test_control_unbind_without_guard_loses_data(vm: BootResult) -> None:
    r = vm.scenario("control")
    r.expect_ran()
    n = r.notes()
    r.expect(int(n.get("dirty_kb") or 0) >= 1024, f"the data was not left unwritten ({n})")
    r.expect(n.get("unbind_rc") == "0" and n.get("driver_after") == "",
             f"without the guard the unbind should have gone through ({n})")
    check = vm.check_stick("control", {"data.bin": ("control", "data.bin")})
    r.expect(not check.intact, "the control did not lose the data: the scenario no longer "
             "shows the yank it guards against\n" + check.summary())


def test_sysfs_and_usbfs_detach_refused(vm: BootResult) -> None:
    r = vm.scenario("sysfs")
    r.expect_ran()
    _guard_enabled(r)
    n = r.notes()
    for door in ("unbind", "auth_dev", "auth_intf", "remove", "config"):
        r.expect(n.get(f"{door}_rc") not in (None, "0")
                 and "busy" in n.get(f"{door}_err", "").lower(),
                 f"{door}: expected 'Device or resource busy' ({n})")
    ioctls = dict(line.split() for line in r.file("ioctls.out").splitlines() if " " in line)
    r.expect(ioctls == {"DISCONNECT": "EBUSY", "DISCONNECT_CLAIM": "EBUSY"},
             f"usbfs detach ioctls: {r.file('ioctls.out')}")
    _kept(r, vm, "sysfs", "sysfs")
    log = (vm.share / "out" / "safeusbd.log").read_text(errors="replace")
    r.expect("sysfs unbind: refused" in log and n["intf"] in log
             and "stays with the host" in log and "mounted" in log,
             f"safeusbd did not log the refusal with inspect's reason:\n{log[-3000:]}")


def test_usbredirect_refused(vm: BootResult) -> None:
    r = vm.scenario("redirect")
    r.expect_ran()
    _guard_enabled(r)
    n = r.notes()
    r.expect(n.get("redirect_driver") == "usb-storage",
             f"usbredirect took the stick ({n}): {r.file('redirect.err')[-500:]}")
    _kept(r, vm, "redir", "redirect")
    log = (vm.share / "out" / "safeusbd.log").read_text(errors="replace")
    r.expect("(usbredirect, uid 0)" in log, f"the refusal of usbredirect is not logged:\n"
             f"{log[-3000:]}")


def test_qemu_usb_host_leaves_stick_with_host(vm: BootResult) -> None:
    r = vm.scenario("qemu")
    r.expect_ran()
    _guard_enabled(r)
    _kept(r, vm, "qemu", "qemu")
    log = (vm.share / "out" / "safeusbd.log").read_text(errors="replace")
    r.expect("qemu-system-x86" in log and "USBDEVFS_DISCONNECT" in log,
             f"the refusal of QEMU is not logged:\n{log[-3000:]}\nQEMU said:\n"
             f"{r.file('qemu.err')[-1000:]}")


def test_idle_stick_taken_at_second_attempt(vm: BootResult) -> None:
    r = vm.scenario("idle")
    r.expect_ran()
    n = r.notes()
    # Refused: usbredirect did not get the stick (usbfs) and said why. Its driver is
    # usb-storage still, or none already when safeusbd, told of the refusal, prepared it
    # within the second the script waits (usbredirect's libusb may then even crash).
    r.expect(n.get("first_driver") in ("usb-storage", "") and n.get("driver_after_first")
             in ("usb-storage", "") and (n.get("first_running") == "0" or
                                          "Error starting usbredirhost" in r.file("first.err")),
             f"the first attempt was not refused ({n}): {r.file('first.err')[-500:]}")
    r.expect(n.get("prepared") == "1" and n.get("record") == "1",
             f"safeusbd did not prepare the idle stick after the refusal ({n})")
    r.expect(n.get("second_driver") == "usbfs" and n.get("second_running") == "1",
             f"the second attempt did not take the stick ({n}): "
             f"{r.file('second.err')[-500:]}")
    r.expect(n.get("status_rc") == "0", f"guard status: {r.file('guard-status.out')}")
    status = r.file("status.out")
    r.expect("guard: on" in status and "usbredirect" in status and "was idle: prepared" in
             status, f"safeusb status does not show the guard and its refusal:\n{status}")


def _refused_then_prepared(r: ScenarioResult, vm: BootResult, who: str) -> str:
    """safeusbd logged the refusal of ``who`` (a regex) for the scenario's port and
    prepared the idle stick on it. Returns the log."""
    n = r.notes()
    log = (vm.share / "out" / "safeusbd.log").read_text(errors="replace")
    port = re.escape(n["port"])
    r.expect(re.search(rf"{who}\) tried to detach usb-storage from {port}(:[0-9.]+)? ", log) and
             f"{n['port']} was idle: prepared by the policy" in log,
             f"safeusbd did not log the refusal ({who}) and the prepare of {n['port']}:\n"
             f"{log[-3000:]}")
    r.expect(n.get("prepared") == "1" and n.get("record") == "1",
             f"safeusbd did not prepare the idle stick after the refusal ({n})")
    return log


def test_idle_stick_unbound_through_sysfs_after_first_attempt(vm: BootResult) -> None:
    """The unbind is refused, at the first attempt and the second alike (the guard does
    not read which interface is written); safeusbd's prepare on the first refusal unbinds
    it, so after the first attempt the interface is without driver and its disk gone."""
    r = vm.scenario("idle-sysfs")
    r.expect_ran()
    _guard_enabled(r)
    n = r.notes()
    r.expect(n.get("first_rc") not in (None, "0") and "busy" in n.get("first_err", "").lower()
             and int(n.get("disks_before") or 0) >= 1,
             f"the first unbind was not refused with EBUSY ({n})")
    log = _refused_then_prepared(r, vm, r"\(bash, uid 0")
    r.expect(n.get("second_driver") == "" and n.get("disks_after") == "0",
             f"the interface is not unbound after the second attempt ({n})")
    r.expect(n.get("second_rc") not in (None, "0") and "busy" in n.get("second_err", "").lower()
             and "usb-storage is unbound from it now, as asked" in log
             and f"{n['port']} is already taken by safeusb: nothing more to do" in log,
             f"the second unbind: expected the guard's EBUSY and nothing more done ({n}):\n"
             f"{log[-2000:]}")


def _repeats_collapsed(r: ScenarioResult, log: str) -> None:
    """QEMU closing its dead device asks usbfs CONNECT over and over while the stick is
    handed over: each is refused, but safeusbd logs the first and then one line with how
    many more, and `safeusb guard status` keeps one refusal with the count."""
    port = re.escape(r.notes()["port"])
    try:
        kept = json.loads(r.file("guard-status.json"))["refusals"]
    except (ValueError, KeyError, TypeError):
        r.fail(f"safeusb guard status --json: {r.file('guard-status.json')[-1000:]}")
    shown = [x for x in kept if x.get("port") == r.notes()["port"]
             and x.get("kind") == "usbfs USBDEVFS_CONNECT"]
    counted = sum(int(x.get("count", 1)) for x in shown)
    logged = re.findall(rf"tried to bind .* {port}(:[0-9.]+)? .*USBDEVFS_CONNECT", log)
    r.expect(counted >= 2 and len(logged) < counted
             and re.search(rf"tried to bind .* {port}(:[0-9.]+)? .*USBDEVFS_CONNECT while .* "
                           rf"again \d+ more times? within", log)
             and "times, the last at" in r.file("status.out"),
             f"QEMU's repeated CONNECTs: {counted} refused as kept in guard status, "
             f"{len(logged)} logged (expected one line and a count):\n{shown}\n"
             f"{r.file('status.out')}")


def test_idle_stick_taken_by_qemu_at_second_launch(vm: BootResult) -> None:
    """QEMU started directly: the first is refused (it runs on with a dead device and the
    node open); safeusbd prepares the stick anyway and marks its record; that QEMU quitting
    gives nothing back; the second QEMU's guest gets the stick (QEMU claims it), and once
    that QEMU quits safeusbd gives the stick back."""
    r = vm.scenario("idle-qemu")
    r.expect_ran()
    _guard_enabled(r)
    n = r.notes()
    r.expect(n.get("first_running") == "1" and int(n.get("first_fds") or 0) >= 1
             and n.get("first_driver") in ("usb-storage", ""),
             f"the first QEMU was not refused as expected ({n}): {r.file('first.err')[-500:]}")
    log = _refused_then_prepared(r, vm, r"\(qemu-system-x86[^,]*, uid 0")
    r.expect(n.get("after_refusal") == "1",
             f"the record of the stick prepared on the refusal is not marked so ({n})")
    r.expect(n.get("driver_before_second") == "" and n.get("record_before_second") == "1",
             f"the refused QEMU quitting gave the stick back to the host ({n})")
    r.expect(n.get("second_running") == "1" and int(n.get("second_fds") or 0) >= 1
             and n.get("second_driver") == "usbfs",
             f"the second QEMU did not take the stick ({n}): {r.file('second.err')[-500:]}"
             f"\ninfo usb: {r.file('second-info-usb.out')}")
    r.expect(n.get("taken") == "0" and n.get("given_back") == "0"
             and n.get("driver_given_back") == "usb-storage"
             and n.get("record_given_back") == "0",
             f"safeusbd did not follow the second QEMU taking the stick and letting it go "
             f"(given back, usb-storage bound, record removed) ({n}):\n{r.file('log.out')}")
    _repeats_collapsed(r, log)


def test_idle_stick_attached_by_virsh_at_second_attempt(vm: BootResult) -> None:
    """virsh attach-device --live into g1 (not protected): the first gives g1 a dead
    device; safeusbd prepares the stick for g1 and marks its record; virsh detach-device of
    the dead device gives nothing back; the same attach again gives g1's QEMU the stick,
    whose file is intact from outside."""
    r, n = libvirt_scenario(vm, "idle-libvirt")
    _guard_enabled(r)
    r.expect(n.get("first_driver") in ("usb-storage", "") and n.get("first_qemu_fds") != "0",
             f"the first attach was not refused in the kernel ({n}): "
             f"{r.file('first.out')}{r.file('first.err')}")
    _refused_then_prepared(r, vm, rf"pid {n['qemu_pid']} \(qemu[^,]*, uid \d+, QEMU of "
                           rf"domain g1")
    r.expect(n.get("after_refusal") == "1",
             f"the record of the stick prepared on the refusal is not marked so ({n})")
    r.expect(n.get("detach_rc") == "0", f"virsh detach-device: {r.file('detach.err')}")
    r.expect(n.get("detached_driver") == "" and n.get("record_before_second") == "1",
             f"g1's QEMU closing the dead device gave the stick back to the host ({n})")
    r.expect(n.get("second_rc") == "0" and n.get("second_driver") == "usbfs"
             and int(n.get("second_qemu_fds") or 0) >= 1,
             f"the second attach did not give g1 the stick ({n}): {r.file('second.out')}"
             f"{r.file('second.err')}\ninfo usb: {r.file('second-info-usb.out')}")
    check = vm.check_stick("idle-lv", {"data.bin": ("idle-libvirt", "data.bin")})
    r.expect(check.intact, check.summary())


def test_virsh_attach_into_unprotected_domain_leaves_stick_with_host(vm: BootResult) -> None:
    r, n = libvirt_scenario(vm, "libvirt")
    _guard_enabled(r)
    r.expect(n.get("qemu_pid", "").isdigit() and n.get("qemu_uid", "0") not in ("", "0")
             and "(enforce)" in n.get("qemu_label", ""),
             f"g1's QEMU is not libvirt's stock one (confined, not root): {n}")
    _kept(r, vm, "lv", "libvirt")
    log = (vm.share / "out" / "safeusbd.log").read_text(errors="replace")
    who = re.compile(rf"pid {n['qemu_pid']} \(qemu[^,]*, uid {n['qemu_uid']}, QEMU of domain "
                     rf"g1\) tried to detach usb-storage from {re.escape(n['port'])} ")
    r.expect(who.search(log) is not None
             and f"{n['port']} stays with the host" in log and "mounted" in log,
             f"safeusbd did not log the refusal naming g1's QEMU ({who.pattern}) and the "
             f"reason:\n"
             f"{log[-3000:]}\nvirsh said ({n.get('attach_rc')}): {r.file('attach.out')}"
             f"{r.file('attach.err')}")
    status = r.file("status.out")
    r.expect(f"uid {n['qemu_uid']}, QEMU of domain g1)" in status
             and "refused to domain g1" in status and n["port"] in status,
             f"safeusb status does not show the stick refused to g1:\n{status}")


def test_rebind_refused_while_handed_over(vm: BootResult) -> None:
    r = vm.scenario("rebind")
    r.expect_ran()
    _guard_enabled(r)
    n = r.notes()
    r.expect(n.get("prepare_rc") == "0" and n.get("driver_prepared") == "",
             f"safeusb prepare did not hand the idle stick over ({n}): "
             f"{r.file('prepare.out')}{r.file('prepare.err')}")
    r.expect("1 device(s) handed over by safeusb" in r.file("guard-status-handed.out"),
             f"guard status: {r.file('guard-status-handed.out')}")
    for door in ("bind", "probe", "new_id", "config", "auth_intf"):
        r.expect(n.get(f"{door}_rc") not in (None, "0")
                 and "busy" in n.get(f"{door}_err", "").lower(),
                 f"{door}: expected 'Device or resource busy' ({n})")
    r.expect(r.file("connect.out").split() == ["CONNECT", "EBUSY"],
             f"usbfs CONNECT: {r.file('connect.out')}")
    r.expect(n.get("driver_after") == "" and n.get("disks_after") == "0",
             f"the disk came back to the host while handed over ({n})")
    r.expect(n.get("release_rc") == "0" and n.get("driver_released") == "usb-storage"
             and int(n.get("disks_released") or 0) >= 1,
             f"safeusb release did not give the stick back ({n}): "
             f"{r.file('release.out')}{r.file('release.err')}")
    r.expect(n.get("probe_after_rc") == "0" and "device(s) handed over by safeusb" not in
             r.file("guard-status-after.out"),
             f"binding is still refused after the give-back ({n}): "
             f"{r.file('guard-status-after.out')}")
    log = (vm.share / "out" / "safeusbd.log").read_text(errors="replace")
    r.expect(f"tried to bind usb-storage to {n['intf']}" in log
             and "sysfs drivers_probe while safeusb has a device handed over" in log,
             f"safeusbd did not log the refused binds:\n{log[-3000:]}")
