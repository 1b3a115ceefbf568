"""The hotplug gate under a real libvirtd on the real kernel (the live hotplug issue),
with libvirt as Debian ships it: QEMU and the gate as libvirt-qemu under the domain's
AppArmor profile, in QEMU's own mount namespace; safeusb's rules put in by
`safeusb install-confinement` (safeusb/lab/guest/stock-up.sh).

One boot with safeusbd (started on its own before libvirtd; the gate asks it to prepare),
the hook, libvirtd and the paused nested domain g1. In order: `safeusb protect g1` and
a restart behind the gate; a plain `virsh attach-device --live` of a mounted stick with
4 MiB dirty, refused under the built-in policy, and the same stick asked for over HMP
(quoted, hexadecimal/octal), refused too; an ordinary user on safeusbd's socket; the hook
refusing a domain that starts with that stick while safeusbd runs; virt-xml's hotplug
(virt-manager's library) of a third stick, refused while mounted and attached once idle;
the same attach of another stick under `mount = "unmount"` in /etc/safeusb/policy.toml,
allowed after the flush, QEMU holding exactly that stick's node, then detached and added
again over HMP by hexadecimal bus and octal address, QEMU again holding that node; a
decision past its deadline; libvirtd restarted under the running domain; the gate's proxy
killed under it; `safeusb unprotect g1`. The images are checked here afterwards.
"""

from __future__ import annotations

import pytest

from safeusb.gate.launcher import GATE_ROOT
from safeusb.install import render
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
from tests.vm import REPO

pytestmark = pytest.mark.vm

REAL = "/usr/bin/qemu-system-x86_64"
LAUNCHER = GATE_ROOT + REAL

BOOT = Boot(
    name="gate",
    libvirt=True,
    safeusbd=True,  # the gate's decisions are safeusbd's
    # The hook too, as install-hook renders it (the hook scenario: it needs no daemon).
    libvirt_hooks={"qemu.d/safeusb": render(str(REPO / ".venv" / "bin" / "python3"))},
    rw_overlays=("/usr/local/lib",),
    timeout=1500,  # eleven scenarios; each domain start loads AppArmor profiles under TCG
    sticks=(Stick("refuse", Image.ext4()), Stick("give", Image.ext4()),
            Stick("xml", Image.ext4()),
            # Writes throttled to 192 KiB/s: 12 MiB take about a minute to flush.
            Stick("slow", Image.ext4(), write_bps=192 * 1024)),
    scenarios=(
        Scenario("protect", "gate-protect.sh", timeout=400),
        Scenario("refuse", "gate-refuse.sh", payloads={"data.bin": 4 * MIB}, timeout=180),
        Scenario("others", "gate-others.sh", timeout=180),
        Scenario("hook", "gate-hook.sh", timeout=180),
        Scenario("virtxml", "gate-virtxml.sh", payloads={"data.bin": 4 * MIB}, timeout=420),
        Scenario("give", "gate-give.sh", payloads={"data.bin": 4 * MIB}, timeout=180),
        Scenario("cancel", "gate-cancel.sh", payloads={"data.bin": 12 * MIB}, timeout=240),
        Scenario("restart", "gate-restart.sh", timeout=240),
        Scenario("kill", "gate-kill.sh", timeout=240),
        Scenario("unprotect", "gate-unprotect.sh", timeout=300),
    ),
)


@pytest.fixture(scope="module")
def vm(vm_runner: Runner, safeusb_cli: str) -> BootResult:
    return vm_runner.run(BOOT)


def paused_reply(r: ScenarioResult) -> bool:
    """query-status went through the gate and QEMU answered: not running."""
    return (r.file("status.rc").strip() == "0"
            and '"running":false' in r.file("status.out").replace(" ", ""))


def test_protect_and_restart_behind_the_gate(vm: BootResult) -> None:
    r, n = ran(vm, "protect")
    r.expect(n.get("state_before") == "paused", f"g1 was not running paused before ({n})")
    r.expect(r.file("protect.rc").strip() == "0", step(r, "protect"))
    r.expect(n.get("inactive_emulator") == LAUNCHER and n.get("metadata") == "1",
             f"the definition does not name the gate and keep the real emulator ({n})")
    r.expect(n.get("live_emulator_before_restart") == REAL,
             f"the running domain's emulator changed before its restart ({n})")
    r.expect(n.get("launcher_target", "").endswith("/safeusb-qemu-gate"),
             f"the launcher is not a link to safeusb-qemu-gate ({n})")
    r.expect(r.file("start.rc").strip() == "0",
             step(r, "start") + "\n--- g1.log\n" + r.file("g1.log")[-3000:])
    r.expect(n.get("live_emulator") == LAUNCHER and n.get("state") == "paused",
             f"g1 does not run paused behind the gate ({n})")
    r.expect(n.get("qemu_exe") == REAL,
             f"libvirt's pid is not the real QEMU ({n})\n{r.file('g1.log')[-3000:]}")
    r.expect(n.get("proxies") == "1", f"expected one gate proxy process ({n})")
    r.expect(paused_reply(r), step(r, "status"))
    # libvirt as Debian ships it: QEMU and the gate as libvirt-qemu, both confined by the
    # domain's AppArmor profile, QEMU in a mount namespace of its own; libvirtd confined.
    label = n.get("qemu_label", "")
    r.expect(n.get("qemu_user") == "libvirt-qemu" and label.startswith("libvirt-")
             and label.endswith("(enforce)") and n.get("qemu_own_mntns") == "1",
             f"QEMU does not run as libvirt ships it ({n})")
    r.expect(n.get("proxy_user") == "libvirt-qemu" and n.get("proxy_label") == label,
             f"the gate's proxy does not run as QEMU's user under its profile ({n})")
    r.expect(n.get("libvirtd_label") == "libvirtd (enforce)", f"libvirtd is not confined ({n})")
    r.expect("guards the QMP monitor of g1" in r.file("gate.log"),
             f"the domain log has no word from the gate:\n{r.file('g1.log')[-3000:]}")


def test_refused_attach_names_the_mountpoint_and_changes_nothing(vm: BootResult) -> None:
    r, n = ran(vm, "refuse")
    r.expect(int(n.get("dirty_kb") or 0) >= 1024, f"4 MiB were not dirty before ({n})")
    out = r.file("attach.out")
    r.expect(n.get("attach_rc") != "0" and "safeusb:" in out and "/tmp/su-refuse" in out,
             f"virsh attach-device did not fail with safeusb's reason naming the "
             f"mountpoint:\n{out}\n--- gate\n{r.file('gate.log')}")
    r.expect(n.get("mounted_after") == "1" and n.get("disk_after") == "1"
             and int(n.get("dirty_kb_after") or 0) >= 1024,
             f"the refusal changed the host ({n})")
    r.expect(n.get("in_domain") == "0" and n.get("state") == "paused",
             f"after the refusal the domain has the device or stopped ({n})")
    r.expect("refused usb-host" in r.file("gate.log"),
             f"the gate did not log its refusal:\n{r.file('gate.log')}")
    check = vm.check_stick("refuse", {"data.bin": ("refuse", "data.bin")})
    r.expect(check.intact, check.summary())


def test_hmp_forms_of_the_same_stick_are_refused_and_qemu_never_opens_it(
        vm: BootResult) -> None:
    """A quoted HMP argument (QEMU strips the quotes: once forwarded unchecked, the stick
    went to the guest and the file read back empty) and hexadecimal/octal numbers: the
    gate reads the same stick as QEMU and refuses it, naming the mountpoint."""
    r, n = ran(vm, "refuse")
    for tag in ("hmp_quoted", "hmp_octal"):
        out = r.file(f"{tag}.out") + r.file(f"{tag}.err")
        r.expect(r.file(f"{tag}.rc").strip() != "0" and "safeusb:" in out
                 and "/tmp/su-refuse" in out,
                 f"{tag}: not refused by the gate naming the mountpoint\n{step(r, tag)}"
                 f"\n--- gate\n{r.file('gate.log')}")
    r.expect(n.get("mounted_after_hmp") == "1"
             and int(n.get("dirty_kb_after_hmp") or 0) >= 1024
             and n.get("qemu_usb_fds_after_hmp") == "" and n.get("state_after_hmp") == "paused",
             f"after the HMP requests the stick is unmounted, flushed or open in QEMU ({n})")
    r.expect("q1" not in r.file("info_usb.out") and "q2" not in r.file("info_usb.out"),
             step(r, "info_usb"))
    r.expect(r.file("gate.log").count("refused usb-host") >= 3,
             f"the gate did not log both HMP refusals:\n{r.file('gate.log')}")


def test_an_ordinary_user_cannot_prepare_or_release(vm: BootResult) -> None:
    """uid 65534 on safeusbd's socket: prepare and release of the mounted stick for g1
    are refused and logged; inspect is answered; nothing on the host changed."""
    r, n = ran(vm, "others")
    r.expect(n.get("uid") == "65534", f"the requests did not run as nobody ({n})")
    for op in ("prepare", "release"):
        r.expect(r.file(f"{op}.rc").strip() == "1" and "error:" in r.file(f"{op}.out")
                 and "only root or a QEMU process" in r.file(f"{op}.out"), step(r, op))
    r.expect(r.file("inspect.rc").strip() == "0" and "su-refuse" in r.file("inspect.out"),
             step(r, "inspect"))
    r.expect(n.get("mounted_after") == "1" and n.get("disk_after") == "1"
             and n.get("records") == "0", f"the host changed ({n})")
    log_path = vm.share / "out" / "safeusbd.log"
    log = log_path.read_text() if log_path.exists() else ""
    for op in ("prepare", "release"):
        r.expect(any("uid 65534" in line and f": {op} " in line and "refused" in line
                     for line in log.splitlines()),
                 f"safeusbd did not log the refused {op} of uid 65534:\n{log}")


def test_the_hook_refuses_on_its_own_while_safeusbd_runs(vm: BootResult) -> None:
    """libvirtd runs the hook as root: it prepares in its own process whether or not the
    daemon runs (the handover boot has no daemon); here the daemon runs and is not asked."""
    r, n = ran(vm, "hook")
    out = r.file("start.out") + r.file("start.err")
    r.expect(n.get("safeusbd_up") == "1", f"safeusbd was not running ({n})")
    r.expect(r.file("start.rc").strip() != "0" and "/tmp/su-refuse" in out
             and "safeusb" in out and n.get("state") == "shut off",
             f"virsh start of h1 was not refused by the hook naming the mountpoint\n"
             f"{step(r, 'start')}")
    r.expect(n.get("mounted_after") == "1" and int(n.get("dirty_kb_after") or 0) >= 1024,
             f"the refusal changed the host ({n})")
    log_path = vm.share / "out" / "safeusbd.log"
    log = log_path.read_text() if log_path.exists() else ""
    r.expect("domain h1" not in log, f"safeusbd was asked about h1:\n{log}")


def test_virt_xml_hotplug_refused_when_mounted_and_attached_when_idle(
        vm: BootResult) -> None:
    """virt-manager's library (virt-xml --add-device --hostdev BUS.DEV --update)."""
    r, n = ran(vm, "virtxml")
    r.expect(int(n.get("dirty_kb") or 0) >= 1024, f"4 MiB were not dirty before ({n})")
    busy = r.file("busy.out") + r.file("busy.err")
    r.expect(r.file("busy.rc").strip() != "0" and "safeusb:" in busy and "/tmp/su-xml" in busy,
             f"virt-xml's hotplug of the mounted stick was not refused with the reason\n"
             f"{step(r, 'busy')}\n--- gate\n{r.file('gate.log')}")
    r.expect(n.get("mounted_after") == "1" and int(n.get("dirty_kb_after") or 0) >= 1024
             and n.get("live_after") == "0" and n.get("defined_after") == "0",
             f"the refusal changed the host or the domain ({n})")
    r.expect(r.file("idle.rc").strip() == "0"
             and "Device hotplug successful" in r.file("idle.out"), step(r, "idle"))
    r.expect(n.get("live_idle") == "1" and n.get("driver_idle") != "usb-storage"
             and n.get("qemu_usb_fds") == n.get("xml_node"),
             f"the idle stick is not QEMU's after virt-xml's hotplug ({n})")
    r.expect("QEMU USB HARDDRIVE" in r.file("info_usb.out").upper(), step(r, "info_usb"))
    check = vm.check_stick("xml", {"data.bin": ("virtxml", "data.bin")})
    r.expect(check.intact, check.summary())


def test_unmount_policy_attach_succeeds_after_flush(vm: BootResult) -> None:
    r, n = ran(vm, "give")
    r.expect(int(n.get("dirty_kb") or 0) >= 1024, f"4 MiB were not dirty before ({n})")
    out = r.file("attach.out")
    r.expect(n.get("attach_rc") == "0" and "attached successfully" in out,
             f"virsh attach-device failed under mount = \"unmount\":\n{out}\n--- gate\n"
             f"{r.file('gate.log')}")
    r.expect(n.get("mounted_after") == "0" and n.get("disk_after") == "0"
             and n.get("driver_after") != "usb-storage",
             f"the stick is still mounted, present or bound to usb-storage ({n})")
    r.expect(n.get("in_domain") == "1" and n.get("state") == "paused",
             f"the live domain does not have the device ({n})")
    r.expect("allowed usb-host" in r.file("gate.log"),
             f"the gate did not log the decision:\n{r.file('gate.log')}")
    r.expect(r.file("kbd.rc").strip() == "0" and n.get("keyboards") == "1", step(r, "kbd"))
    r.expect(paused_reply(r), step(r, "status"))
    info = r.file("info_usb.out")
    r.expect(r.file("info_usb.rc").strip() == "0" and "QEMU USB Keyboard" in info
             and "QEMU USB HARDDRIVE" in info.upper(), step(r, "info_usb"))
    check = vm.check_stick("give", {"data.bin": ("give", "data.bin")})
    r.expect(check.intact, "image not intact after the gate's flush and handover:\n"
             + check.summary())


def test_the_gate_decides_through_safeusbd(vm: BootResult) -> None:
    """Each decision was safeusbd's: its log shows the refusal of the mounted stick and
    the prepare that handed the other over, both asked for domain g1."""
    r, n = ran(vm, "give")
    log_path = vm.share / "out" / "safeusbd.log"
    log = log_path.read_text() if log_path.exists() else ""
    r.expect("safeusbd_up" in vm.timings, f"safeusbd did not answer before libvirtd:\n{log}")
    node = n.get("give_node", "")
    bus, dev = int(node.split("/")[-2]), int(node.split("/")[-1])
    r.expect(f"prepare bus {bus} device {dev} for domain g1" in log
             and f"prepare bus {bus} device {dev}: done (handed over)" in log,
             f"safeusbd did not prepare bus {bus} device {dev} for g1:\n{log}")
    _, refused = ran(vm, "refuse")
    rbus, rdev = (int(x) for x in refused.get("refuse_busdev", "0:0").split(":"))
    r.expect(f"prepare bus {rbus} device {rdev}: refused: " in log and "/tmp/su-refuse" in log,
             f"safeusbd did not refuse bus {rbus} device {rdev}:\n{log}")


def test_the_device_qemu_opened_is_the_one_the_gate_checked(vm: BootResult) -> None:
    """libvirt's attach (fd set) and an HMP device_add by hexadecimal bus and octal
    address: QEMU's open USB device node is the stick the gate decided on. Under libvirt's
    confinement QEMU cannot open a node libvirt did not give it (its own /dev, the
    cgroup's device list, the AppArmor profile): the HMP add the gate allowed then fails
    in QEMU naming that same device, and QEMU holds no USB node at all."""
    r, n = ran(vm, "give")
    node = n.get("give_node", "")
    r.expect(node.startswith("/dev/bus/usb/") and n.get("qemu_usb_fds") == node,
             f"after libvirt's attach QEMU holds {n.get('qemu_usb_fds')!r}, not {node} ({n})")
    r.expect(r.file("detach.rc").strip() == "0" and n.get("qemu_usb_fds_detached") == "",
             f"the detach left QEMU holding a USB device ({n})\n{step(r, 'detach')}")
    bus, dev = int(node.split("/")[-2]), int(node.split("/")[-1])
    r.expect(f"allowed usb-host hostbus={bus},hostaddr={dev}" in r.file("gate.log"),
             f"the gate's log does not show it allowed bus {bus} address {dev}:\n"
             f"{r.file('gate.log')}")
    answer = r.file("hmp_add.out").strip()
    opened = r.file("hmp_add.rc").strip() == "0" and answer == ""
    confined = answer == f"Error: failed to open host usb device {bus}:{dev}"
    r.expect(opened or confined,
             f"HMP device_add by {n.get('hmp_bus_text')}/{n.get('hmp_addr_text')}: neither "
             f"added nor refused by QEMU for bus {bus} address {dev}\n{step(r, 'hmp_add')}"
             f"\n--- gate\n{r.file('gate.log')}")
    r.expect(n.get("qemu_usb_fds_hmp") == (node if opened else ""),
             f"after the HMP add QEMU holds {n.get('qemu_usb_fds_hmp')!r} ({n})")
    r.expect(("q2" in r.file("info_usb_hmp.out")) == opened
             and n.get("state_after_hmp") == "paused", step(r, "info_usb_hmp"))


@pytest.mark.fault
def test_a_decision_past_the_deadline_is_cancelled_and_undone(vm: BootResult) -> None:
    """The flush outlasts the gate's 30 s deadline: libvirt is told no only once prepare
    has stopped and put everything back; the stick stays mounted and untaken."""
    r, n = ran(vm, "cancel")
    out = r.file("attach.out")
    r.expect(n.get("attach_rc") != "0" and "no decision within 30 s" in out
             and "cancelled" in out and "host state: unchanged" in out,
             f"the attach was not refused as cancelled ({n}):\n{out}\n{r.file('gate.log')}")
    r.expect(int(n.get("dirty_kb") or 0) >= 8 * 1024, f"too little was unwritten ({n})")
    r.expect(n.get("mounted_after") == "1" and n.get("disk_after") == "1"
             and n.get("driver_after") == "usb-storage" and n.get("record_after") == "0",
             f"the cancelled prepare left the host changed ({n})")
    r.expect(n.get("in_domain_after") == n.get("in_domain_before"),
             f"the stick reached the guest ({n})")
    check = vm.check_stick("slow", {"data.bin": ("cancel", "data.bin")})
    r.expect(check.intact, check.summary())


def test_libvirtd_restart_reconnects_through_the_gate(vm: BootResult) -> None:
    r, n = ran(vm, "restart")
    r.expect(n.get("libvirtd_old") and n.get("libvirtd_old_alive") == "0"
             and n.get("libvirtd_new") not in ("", n.get("libvirtd_old")),
             f"libvirtd was not restarted ({n})")
    r.expect(n.get("state") == "paused" and n.get("qemu_alive") == "1"
             and n.get("qemu_pid_after") == n.get("qemu_pid")
             and n.get("proxy") and n.get("proxy_after") == n.get("proxy"),
             f"the domain, its QEMU or the proxy did not outlive the restart ({n})")
    r.expect(paused_reply(r), step(r, "status"))
    out = r.file("attach.out")
    r.expect(n.get("attach_rc") != "0" and "/tmp/su-refuse" in out
             and n.get("mounted_after") == "1" and int(n.get("dirty_kb_after") or 0) >= 1024,
             f"after the restart the attach was not refused, or the host changed ({n})\n{out}")
    log = r.file("gate.log")
    r.expect("libvirt closed the monitor" in log and log.count("refused usb-host") >= 2,
             f"the gate's log does not show the new session refusing:\n{log}")


@pytest.mark.fault
def test_killed_proxy_leaves_the_guest_running(vm: BootResult) -> None:
    r, n = ran(vm, "kill")
    r.expect(n.get("proxies") and n.get("proxies_alive_after") == "0",
             f"no gate proxy was found and killed ({n})")
    r.expect(n.get("state_after_kill") == "paused" and n.get("qemu_alive_after_kill") == "1"
             and n.get("qemu_pid_after_kill") == n.get("qemu_pid"),
             f"killing the proxy ended or disturbed the domain ({n})")
    r.expect(n.get("state_later") == "paused" and n.get("qemu_alive_later") == "1",
             f"the domain did not outlive the proxy by 5 s ({n})")
    r.expect(r.file("noanswer.rc").strip() == "124" and n.get("state_after_noanswer") == "paused",
             f"a monitor command after the proxy died did not go unanswered ({n})\n"
             f"{step(r, 'noanswer')}")
    r.expect(r.file("destroy.rc").strip() == "0" and n.get("state_after_destroy") == "shut off"
             and n.get("qemu_alive_after_destroy") == "0",
             f"virsh destroy did not end the domain ({n})\n{step(r, 'destroy')}")


def test_unprotect_restores_the_emulator(vm: BootResult) -> None:
    r, n = ran(vm, "unprotect")
    r.expect(r.file("unprotect.rc").strip() == "0", step(r, "unprotect"))
    r.expect(n.get("inactive_emulator") == REAL and n.get("metadata") == "0",
             f"the definition still names the gate or keeps safeusb's metadata ({n})")
    r.expect(r.file("start.rc").strip() == "0" and n.get("live_emulator") == REAL
             and n.get("proxies") == "0" and n.get("state") == "paused",
             f"the unprotected domain does not run on the real emulator alone ({n})\n"
             f"{step(r, 'start')}")
