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
instead. Every image is checked here afterwards. Nothing runs `safeusb release`.
"""

from __future__ import annotations

import pytest

from safeusb.gate import GATE_ROOT

from .harness import MIB, Boot, BootResult, Image, Runner, Scenario, ScenarioResult, Stick, step
from .harness import libvirt_scenario as ran

pytestmark = pytest.mark.vm

LAUNCHER = GATE_ROOT + "/usr/bin/qemu-system-x86_64"

BOOT = Boot(
    name="events",
    libvirt=True,
    safeusbd=True,
    rw_overlays=("/usr/local/lib",),
    # Two domain starts (g1 by the driver, g2 behind the gate) under TCG: on a loaded
    # 2-core machine the first alone took 470 s.
    timeout=1200,
    sticks=(Stick("back", Image.ext4()), Stick("crash", Image.ext4()),
            # Writes throttled to 128 KiB/s: the 4 MiB stay unwritten through the attach.
            Stick("late", Image.ext4(), write_bps=128 * 1024)),
    scenarios=(
        Scenario("protect", "events-protect.sh", timeout=240),
        Scenario("newdomain", "events-newdomain.sh", payloads={"data.bin": 4 * MIB},
                 timeout=400),
        Scenario("detach", "events-detach.sh", payloads={"data.bin": 4 * MIB}, timeout=240),
        Scenario("crash", "events-crash.sh", payloads={"data.bin": 4 * MIB}, timeout=240),
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
