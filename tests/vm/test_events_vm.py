"""safeusbd follows the kernel's and libvirt's events, on the real kernel.

One boot with safeusbd (started before libvirtd, as in the gate boot), libvirtd as
Debian ships it and the paused nested domain g1, no libvirt hook (so only safeusbd can
give anything back). In order: the policy asks for mount = "unmount", restore = true and
protect_new_domains; `safeusb status` names g1 unprotected and `safeusb protect --all`
protects it (g1 then stops); (f) g2, defined after safeusbd started, is protected by
safeusbd on libvirt's event, and at its first hotplug a mounted stick with 4 MiB
unwritten is refused; (c) a mounted stick with 4 MiB unwritten attached live to g2
through the gate, then `virsh detach-device`: safeusbd gives it back on its own, mounted
again where it was with its data, record gone; the same with g2's QEMU killed (SIGKILL)
instead. (a) Auto-attach on plug-in (attach_to), with a stand-in automounter in the
guest mounting every new disk at once: the stick AUTO, plugged in by the host (QMP
device_add), goes to g1 and is never mounted on the host; plugged in again, it goes
again; with g1 shut off it stays on the host unmounted until g1 starts. The control: a
stick no rule matches is automounted, as today. Every image is checked here afterwards.
Nothing runs `safeusb release`.
"""

from __future__ import annotations

import pytest

from safeusb.gate.launcher import GATE_ROOT
from safeusb.lab.harness import (
    MIB,
    Boot,
    BootResult,
    Image,
    Runner,
    Scenario,
    ScenarioResult,
    Stick,
    step,
)
from safeusb.lab.harness import libvirt_scenario as ran

pytestmark = pytest.mark.vm

LAUNCHER = GATE_ROOT + "/usr/bin/qemu-system-x86_64"

BOOT = Boot(
    name="events",
    libvirt=True,
    safeusbd=True,
    rw_overlays=("/usr/local/lib",),
    # Four domain starts (g1 by the driver, g2 behind the gate, g1 twice for attach_to)
    # under TCG: on a loaded 2-core machine the first alone took 470 s.
    timeout=2400,
    sticks=(Stick("back", Image.ext4()), Stick("crash", Image.ext4()),
            # Writes throttled to 128 KiB/s: the 4 MiB stay unwritten through the attach.
            Stick("late", Image.ext4(), write_bps=128 * 1024),
            # Not plugged in at boot: the attach_to scenario plugs it in (and again).
            Stick("auto", Image.ext4(), plugged=False)),
    scenarios=(
        Scenario("protect", "events-protect.sh", timeout=240),
        Scenario("newdomain", "events-newdomain.sh", payloads={"data.bin": 4 * MIB},
                 timeout=400),
        Scenario("detach", "events-detach.sh", payloads={"data.bin": 4 * MIB}, timeout=240),
        Scenario("crash", "events-crash.sh", payloads={"data.bin": 4 * MIB}, timeout=240),
        Scenario("autoattach", "events-autoattach.sh", timeout=900),
    ),
)


@pytest.fixture(scope="module")
def vm(vm_runner: Runner, safeusb_cli: str) -> BootResult:
    return vm_runner.run(BOOT)


def daemon_log(vm: BootResult) -> str:
    p = vm.share / "out" / "safeusbd.log"
    return p.read_text(errors="replace") if p.exists() else ""


def test_protect_all_and_status_names_unprotected_domains(vm: BootResult) -> None:
    r, n = ran(vm, "protect")
    before = r.file("status_before.out")
    r.expect("domains not protected" in before and "g1" in before.split(
        "domains not protected")[1].splitlines()[0], step(r, "status_before"))
    r.expect(r.file("all.rc").strip() == "0" and f"g1: emulator {LAUNCHER}"
             in r.file("all.out"), step(r, "all"))
    r.expect(r.file("all_again.rc").strip() == "0"
             and "g1: already protected" in r.file("all_again.out"), step(r, "all_again"))
    r.expect(n.get("inactive_emulator") == LAUNCHER, f"g1's definition has no gate ({n})")


def _handed_over(r: ScenarioResult, n: dict[str, str]) -> None:
    r.expect(int(n.get("dirty_kb") or 0) >= 1024, f"4 MiB were not dirty before ({n})")
    r.expect(n.get("attach_rc") == "0", f"the attach failed ({n}):\n{r.file('attach.out')}")
    r.expect(n.get("mounted_handed") == "0" and n.get("record_handed") == "1"
             and n.get("qemu_fds_handed") == n.get("node"),
             f"the stick was not unmounted, recorded and opened by QEMU ({n})")
    r.expect(n.get("mounted_later") == "0" and n.get("record_later") == "1",
             f"safeusbd gave the stick back while QEMU held it ({n})")


def _given_back(vm: BootResult, r: ScenarioResult, n: dict[str, str], stick: str,
                mountpoint: str) -> None:
    log = r.file("safeusbd.log")
    r.expect(n.get("remounted") == "1" and n.get("record_gone") == "1"
             and n.get("driver_after") == "usb-storage",
             f"safeusbd did not give the stick back: not remounted at {mountpoint}, record "
             f"left or driver not bound ({n})\n--- safeusbd\n{log[-4000:]}")
    r.expect(n.get("options_after") == n.get("options_before"),
             f"mounted again with other options ({n})")
    r.expect(n.get("data_back") == "1", f"data.bin is not on the stick again ({n})")
    r.expect("is back on the host" in log and "given back to the host; record removed" in log,
             f"safeusbd's log does not say it gave the stick back:\n{log[-4000:]}")
    check = vm.check_stick(stick, {"data.bin": (r.name, "data.bin")})
    r.expect(check.intact, check.summary())


def test_detach_gives_the_stick_back_remounted_without_release(vm: BootResult) -> None:
    """(c) `virsh detach-device`: QEMU releases the interfaces and closes the node;
    safeusbd binds usb-storage (QEMU as libvirt-qemu cannot have the kernel do it; as
    root it does) and remounts."""
    r, n = ran(vm, "detach")
    _handed_over(r, n)
    r.expect(r.file("detach.rc").strip() == "0" and n.get("in_domain") == "0",
             step(r, "detach"))
    _given_back(vm, r, n, "back", "/tmp/su-back")


@pytest.mark.fault
def test_killed_qemu_gives_the_stick_back_remounted(vm: BootResult) -> None:
    """(c) The nested QEMU killed while it holds the stick: the kernel frees its claims
    as the process dies; safeusbd gives the stick back and remounts it."""
    r, n = ran(vm, "crash")
    _handed_over(r, n)
    r.expect(n.get("state_after") == "shut off", f"g2 outlived SIGKILL of its QEMU ({n})")
    _given_back(vm, r, n, "crash", "/tmp/su-crash")


def test_a_domain_defined_later_is_guarded_at_its_first_hotplug(vm: BootResult) -> None:
    """(f) protect_new_domains: safeusbd protects g2 on libvirt's DEFINED event; behind the
    gate, its first hotplug, of a mounted stick with 4 MiB unwritten, is refused."""
    r, n = ran(vm, "newdomain")
    log = r.file("safeusbd.log")
    r.expect(r.file("define.rc").strip() == "0", step(r, "define"))
    r.expect(n.get("protected") == "1" and n.get("inactive_emulator") == LAUNCHER,
             f"g2 was not protected on its definition ({n})\n--- safeusbd\n{log[-4000:]}")
    r.expect("domain g2 defined; protected (protect_new_domains)" in log,
             f"safeusbd's log does not say it protected g2:\n{log[-4000:]}")
    r.expect(r.file("start.rc").strip() == "0" and n.get("state") == "paused"
             and n.get("live_emulator") == LAUNCHER,
             f"g2 does not run behind the gate ({n})\n{step(r, 'start')}\n"
             f"{r.file('g2.log')[-3000:]}")
    r.expect(int(n.get("unwritten_kb") or 0) >= 1024, f"4 MiB were not unwritten ({n})")
    out = r.file("attach.out")
    r.expect(n.get("attach_rc") != "0" and "safeusb:" in out and "/tmp/su-late" in out
             and "not yet written" in out,
             f"the attach to g2 was not refused with the mountpoint ({n}):\n{out}\n"
             f"--- gate\n{r.file('gate.log')}")
    r.expect(n.get("mounted_after") == "1" and int(n.get("unwritten_kb_after") or 0) >= 1024
             and n.get("in_domain") == "0", f"the refusal changed the host ({n})")
    check = vm.check_stick("late", {"data.bin": ("newdomain", "data.bin")})
    r.expect(check.intact, check.summary())


def _ext4_mounts(kernel: str) -> list[str]:
    return [ln for ln in kernel.splitlines() if "EXT4-fs (" in ln and "mounted filesystem" in ln]


def test_attach_to_on_plug_in_with_an_automounter(vm: BootResult) -> None:
    """(a) attach_to: the stick plugged in while g1 runs ends in g1, the stand-in
    automounter never mounting it; replugged, it goes again; with g1 shut off it stays on
    the host unmounted and goes to g1 at its next start. Control first: a stick no rule
    matches is automounted."""
    r, n = ran(vm, "autoattach")
    log = r.file("safeusbd.log")
    tail = f"\n--- safeusbd\n{log[-4000:]}\n--- automounter\n{r.file('automount.log')}"
    # Control: the stand-in works, and a device no rule matches is the host's.
    r.expect(n.get("plug_control") == "ok" and n.get("control_mounted") == "1"
             and f"mounted {n.get('control_disk')}" in r.file("automount-control.log")
             and _ext4_mounts(r.file("kernel-control.log")),
             f"the stand-in automounter did not mount the stick no rule matches ({n})"
             f"\n{r.file('automount-control.log')}")
    r.expect(n.get("control_attached") == "0",
             f"safeusbd took the stick no rule matches ({n}){tail}")
    r.expect(r.file("udev_rules.rc").strip() == "0"
             and 'ENV{UDISKS_IGNORE}="1"' in r.file("10-safeusb-attach.rules"),
             step(r, "udev_rules"))
    # Plugged in with g1 running: in g1, QEMU holding its node.
    r.expect(n.get("plug") == "ok" and n.get("in_g1") == "1"
             and n.get("node") in (n.get("qemu_fds") or "").split(),
             f"the stick plugged in did not end in g1 ({n}){tail}")
    r.expect(f"{n.get('usb')} attached to domain g1" in log,
             f"safeusbd's log does not say it attached the stick{tail}")
    status = r.file("status_attached.out")
    r.expect("rule 'test stick'" in status and "-> g1 (running)" in status
             and f"{n.get('usb')} (handed to g1)" in status,
             f"safeusb status does not show the rule, g1 and the stick it holds:\n{status}")
    # Replugged: attached again, at its new address.
    r.expect(n.get("replug") == "ok" and n.get("in_g1_replug") == "1"
             and n.get("busdev_replug") != n.get("busdev")
             and n.get("node_replug") in (n.get("qemu_fds_replug") or "").split(),
             f"the stick plugged in again did not go to g1 again ({n}){tail}")
    # g1 shut off: back on the host, marked, unmounted, no record; then to g1 at its start.
    r.expect(r.file("destroy.rc").strip() == "0" and n.get("back_disk")
             and n.get("back_mounted") == "0" and n.get("back_ignore") == "1"
             and n.get("back_record") == "0",
             f"with g1 shut off the stick is not on the host, marked and unmounted ({n}){tail}")
    waiting = r.file("status_waiting.out")
    r.expect("-> g1 (defined)" in waiting and f"{n.get('usb_replug')} (on the host)" in waiting,
             f"safeusb status does not show the stick waiting on the host:\n{waiting}")
    r.expect(r.file("restart_g1.rc").strip() == "0" and n.get("in_g1_restart") == "1"
             and n.get("node_restart") in (n.get("qemu_fds_restart") or "").split(),
             f"the stick did not go to g1 when g1 started ({n}){tail}"
             f"\n{step(r, 'restart_g1')}")
    # Never mounted on the host: no mount under /media sampled, none in the kernel log,
    # and the automounter skipped each disk udev marked.
    r.expect(r.file("media-mounts.log").strip() == "",
             f"something was mounted under /media:\n{r.file('media-mounts.log')}")
    r.expect(not _ext4_mounts(r.kernel),
             "the kernel mounted an ext4 filesystem:\n" + "\n".join(_ext4_mounts(r.kernel)))
    r.expect("mounted " not in r.file("automount.log").replace("not mounted ", ""),
             f"the stand-in automounter mounted something{tail}")
    check = vm.check_stick("auto", {})
    r.expect(check.intact, check.summary())
