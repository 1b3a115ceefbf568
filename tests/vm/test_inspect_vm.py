"""`safeusb inspect` on a real kernel with emulated USB sticks (the inspect issue's tier 3).

One boot carries a stick per scenario, so scenarios cannot disturb each other; a
second boot has a single stick, named through every kind of selector.
"""

from __future__ import annotations

from typing import Any

import pytest

from safeusb.lab.harness import (
    MIB,
    Boot,
    BootResult,
    Image,
    InspectRun,
    Partition,
    Runner,
    Scenario,
    ScenarioResult,
    Stick,
    UsbDevice,
)

pytestmark = pytest.mark.vm

BOOT = Boot(
    name="inspect",
    sticks=(
        Stick("idle", Image.ext4()),
        Stick("held", Image.ext4()),
        Stick("ns", Image.ext4()),
        Stick("dirty", Image.ext4()),
        Stick("parts", Image.msdos_two()),
        Stick("luks", Image.msdos(Partition(1, 62, fs="none"))),
        Stick("lvm", Image.raw()),
        Stick("swap", Image.raw()),
    ),
    scenarios=(
        Scenario("idle", "inspect-idle.sh"),
        Scenario("held", "inspect-held.sh"),
        Scenario("ns", "inspect-ns.sh"),
        Scenario("dirty", "inspect-dirty.sh", payloads={"data.bin": 4 * MIB}),
        Scenario("parts", "inspect-parts.sh"),
        Scenario("luks", "inspect-luks.sh"),
        Scenario("lvm", "inspect-lvm.sh"),
        Scenario("swap", "inspect-swap.sh"),
        Scenario("errors", "inspect-errors.sh"),
    ),
    modules=("xhci_pci", "usb_storage", "sd_mod", "dm_mod", "dm_crypt"),
)

SELECTOR_BOOT = Boot(
    name="selectors",
    sticks=(Stick("sel", Image.msdos_two()),),
    devices=(UsbDevice.kbd(), UsbDevice.serial_port(), UsbDevice.net()),
    scenarios=(Scenario("devices", "devices.sh"),
               # Nine inspects and a status: a bound on a hang only.
               Scenario("selectors", "inspect-selectors.sh", timeout=300),
               # Five commands under software emulation, one a status of every device: a
               # bound on a hang only.
               Scenario("daemon", "inspect-daemon.sh", payloads={"data.bin": 4 * MIB},
                        timeout=360),
               # The in-kernel scan (BPF iterators) against the /proc scan on Debian 12's
               # 6.1: the host tier's comparison, run in the guest on its loop devices.
               Scenario("bpfscan", "bpfscan-compare.sh", timeout=300)),
    modules=("xhci_pci", "usb_storage", "sd_mod", "usbhid", "ftdi_sio", "cdc_ether",
             "rndis_host", "loop"),
)


# Debian 12's 6.12 (the series of Debian 13 and RHEL 10): a distribution kernel with the
# open-coded mapping iterator (>= 6.7), so the scan's halves keep summaries of what each
# process maps (its mm_lock_seq is the seqcount mainline has from 6.13, backported): the
# same comparison, on that kernel. No USB device: loop devices only.
KERNEL_612_BOOT = Boot(
    name="kernel-6.12",
    kernel="6.12",
    scenarios=(Scenario("bpfscan", "bpfscan-compare.sh", timeout=300),),
    modules=("loop",),
)


@pytest.fixture(scope="module")
def vm(vm_runner: Runner, safeusb_cli: str) -> BootResult:
    return vm_runner.run(BOOT)


@pytest.fixture(scope="module")
def sel_vm(vm_runner: Runner, safeusb_cli: str) -> BootResult:
    return vm_runner.run(SELECTOR_BOOT)


@pytest.fixture(scope="module")
def k612_vm(vm_runner: Runner, safeusb_cli: str) -> BootResult:
    return vm_runner.run(KERNEL_612_BOOT)


def ran(vm: BootResult, name: str) -> ScenarioResult:
    r = vm.scenario(name)
    r.expect_ran()
    return r


def in_use(r: ScenarioResult, tag: str) -> tuple[InspectRun, dict[str, Any]]:
    """The inspect step ``tag`` said exit 1 with valid JSON, free false and reasons."""
    run = r.inspect(tag)
    r.expect(run.rc == 1, f"expected exit 1 (in use)\n{run}")
    try:
        data = run.json
    except ValueError:
        r.fail(f"--json output is not JSON\n{run}")
    r.expect(data.get("free") is False, f"expected \"free\": false\n{run}")
    r.expect(data.get("reasons"), f"expected at least one reason\n{run}")
    return run, data


def block_names(data: dict[str, Any]) -> set[str]:
    return {b["name"] for b in data.get("block_devices", [])}


def test_idle_stick_is_free(vm: BootResult) -> None:
    r = ran(vm, "idle")
    run = r.inspect("idle")
    r.expect(run.rc == 0, f"idle stick: expected exit 0\n{run}")
    data = run.json
    r.expect(data["free"] is True and data["reasons"] == [], f"idle stick not free\n{run}")
    disk = vm.stick_disk("idle")
    r.expect(block_names(data) == {disk}, f"expected exactly {disk} in block_devices\n{run}")


def test_raw_node_held_open(vm: BootResult) -> None:
    r = ran(vm, "held")
    run, _ = in_use(r, "held")
    pid = int(r.notes()["pid"])
    pids = {x.get("pid") for x in run.reasons("open")}
    r.expect(pid in pids, f"pid {pid} holding the disk open is not in an open reason\n{run}")


def test_mounted_in_other_namespace_only(vm: BootResult) -> None:
    r = ran(vm, "ns")
    run, _ = in_use(r, "ns")
    n = r.notes()
    mounts = run.reasons("mount")
    r.expect(any(m.get("mountpoint") == "/tmp/nsmnt" for m in mounts),
             f"no mount reason naming /tmp/nsmnt\n{run}")
    r.expect(any(m.get("mnt_ns") == int(n["mnt_ns"]) for m in mounts),
             f"no mount reason in namespace {n['mnt_ns']} (ours is {n['own_ns']})\n{run}")


def test_mounted_with_dirty_data(vm: BootResult) -> None:
    r = ran(vm, "dirty")
    run, data = in_use(r, "dirty")
    r.expect(int(r.notes().get("dirty_kb") or 0) >= 1024,
             f"the guest kernel did not hold 1 MiB dirty (BdiReclaimable {r.notes()})")
    dirty = sum(b.get("dirty_bytes") or 0 for b in data["block_devices"])
    r.expect(dirty >= MIB, f"dirty_bytes add up to {dirty}, expected >= 1 MiB\n{run}")
    r.expect(run.reasons("mount"), f"no mount reason\n{run}")


def test_partition_mounted(vm: BootResult) -> None:
    r = ran(vm, "parts")
    run, data = in_use(r, "parts")
    disk = r.notes()["mounted"].removeprefix("/dev/")[:-1]
    names = block_names(data)
    r.expect({disk, f"{disk}1", f"{disk}2"} <= names,
             f"block_devices should list {disk}, {disk}1 and {disk}2, got {sorted(names)}\n{run}")
    r.expect(any(m.get("mountpoint") == "/tmp/parts1" for m in run.reasons("mount")),
             f"no mount reason naming /tmp/parts1\n{run}")
    node_run, _ = in_use(r, "parts-node")
    r.expect(node_run.reasons("mount"),
             f"selecting the unmounted partition must still report the mount\n{node_run}")


def test_luks_holder(vm: BootResult) -> None:
    r = ran(vm, "luks")
    run, data = in_use(r, "luks")
    r.expect(r.notes().get("holders", "").startswith("dm-"),
             f"dm-crypt did not hold the partition in the guest ({r.notes()})")
    r.expect(run.reasons("holder"), f"no holder reason for the open LUKS mapping\n{run}")
    r.expect(any(n.startswith("dm-") for n in block_names(data)),
             f"the dm-crypt device is not among block_devices\n{run}")


def test_lvm_active(vm: BootResult) -> None:
    r = ran(vm, "lvm")
    run, data = in_use(r, "lvm")
    r.expect(r.notes().get("holders", "").startswith("dm-"),
             f"LVM did not activate a volume on the stick ({r.notes()})")
    r.expect(run.reasons("holder"), f"no holder reason for the active LV\n{run}")
    r.expect(any(n.startswith("dm-") for n in block_names(data)),
             f"the LV's dm device is not among block_devices\n{run}")


def test_swap(vm: BootResult) -> None:
    r = ran(vm, "swap")
    run, _ = in_use(r, "swap")
    r.expect(run.reasons("swap"), f"no swap reason\n{run}")


@pytest.mark.parametrize("tag", ["nodevice", "nodevice-text", "nosysfs", "nonode", "garbage",
                                 "ambiguous"])
def test_bad_selector(vm: BootResult, tag: str) -> None:
    r = ran(vm, "errors")
    run = r.inspect(tag)
    r.expect(run.rc == 2, f"{tag}: expected exit 2\n{run}")
    r.expect("Traceback" not in run.stderr, f"{tag}: traceback on stderr\n{run}")
    lines = run.stderr.strip().splitlines()
    r.expect(lines, f"{tag}: no message on stderr\n{run}")
    if tag != "ambiguous":  # an ambiguous selector lists the candidates
        r.expect(len(lines) == 1, f"{tag}: expected a one-line message\n{run}")


@pytest.mark.parametrize("tag", ["sysfs", "busdev", "busdev-padded", "vidpid", "disk",
                                 "partition", "usbnode", "xml-vidpid", "xml-address"])
def test_selector(sel_vm: BootResult, tag: str) -> None:
    r = ran(sel_vm, "selectors")
    if tag == "usbnode" and r.notes().get("usbnode") == "absent":
        pytest.skip("no /dev/bus/usb node in the guest")
    run = r.inspect(tag)
    r.expect(run.rc == 0, f"{tag}: expected exit 0 for the idle stick\n{run}")
    data = run.json
    names = block_names(data)
    disk = sel_vm.stick_disk("sel")
    r.expect({disk, f"{disk}1", f"{disk}2"} <= names,
             f"{tag}: selector did not resolve to the stick (block_devices {sorted(names)})\n{run}")


def test_selector_text_output(sel_vm: BootResult) -> None:
    r = ran(sel_vm, "selectors")
    run = r.inspect("text")
    r.expect(run.rc == 0, f"expected exit 0\n{run}")
    r.expect(run.stdout.strip() and not run.stdout.lstrip().startswith("{"),
             f"expected human text\n{run}")


@pytest.mark.parametrize(("what", "vidpid"), [("usb-kbd", "0627:0001"),
                                              ("usb-serial", "0403:6001"),
                                              ("usb-net", "0525:a4a2")])
def test_other_emulated_devices_appear(sel_vm: BootResult, what: str, vidpid: str) -> None:
    r = ran(sel_vm, "devices")
    seen = r.file("usb")
    r.expect(f" {vidpid} " in seen, f"{what} ({vidpid}) not on the guest's USB bus:\n{seen}")


def test_inspect_and_status_through_safeusbd_print_what_reading_here_prints(
        sel_vm: BootResult) -> None:
    """A stick's partition mounted with 4 MiB unwritten and a process holding a file on it:
    `safeusb inspect` and `status` answered by safeusbd print, byte for byte, what they
    print reading the host themselves (--local); an unprivileged user gets root's answer
    through the daemon, holder included, which reading the host as that user cannot see."""
    from safeusb.textout import text_of_json  # noqa: PLC0415

    r = ran(sel_vm, "daemon")
    notes = r.notes()
    r.expect(notes.get("daemon_up") == "yes", f"safeusbd did not start:\n"
             f"{r.file('safeusbd.log')}")
    there, here = r.inspect("d_json"), r.inspect("l_json")
    r.expect((there.rc, there.stdout, there.stderr) == (here.rc, here.stdout, here.stderr),
             f"inspect through safeusbd differs:\n{there.stdout}\n--- read here:\n"
             f"{here.stdout}")
    r.expect(here.rc == 1 and here.reasons("mount") and here.reasons("dirty"),
             f"the dirty stick is not shown mounted with dirty data:\n{here.stdout}")
    holder = int(notes["holder"])
    r.expect(any(o.get("pid") == holder for o in here.reasons("open")),
             f"pid {holder} holding a file on the stick is not shown:\n{here.stdout}")
    nobody = r.inspect("n_d_text")
    r.expect((nobody.rc, nobody.stdout) == (1, text_of_json(here.json)),
             f"an unprivileged user through safeusbd does not get root's answer:\n"
             f"{nobody.stdout}{nobody.stderr}")
    status_there, status_here = r.file("status_d.out"), r.file("status_l.out")
    r.expect(notes.get("status_d_rc") == notes.get("status_l_rc") == "0"
             and status_there == status_here and "NOT safe" in status_here,
             f"status through safeusbd differs:\n{status_there}\n--- read here:\n"
             f"{status_here}")


def test_kernel_scan_matches_proc_on_debian_kernel(sel_vm: BootResult) -> None:
    """The BPF iterators load on 6.1 (CO-RE, the object scripts/build-bpf built) and find
    what the /proc scan finds, field by field (tests/host/test_bpfscan_compare_host.py)."""
    r = ran(sel_vm, "bpfscan")
    n = r.notes()
    out = r.file("pytest.out")
    r.expect(n.get("pytest_rc") == "0", f"the comparison failed on {n.get('kernel')}:\n{out}")
    r.expect(" passed" in out and "skipped" not in out and "failed" not in out,
             f"the comparison did not run in full on {n.get('kernel')}:\n{out}")
    r.expect(n.get("scan_rc") == "0" and n.get("halves") == "0",
             f"6.1 has no open-coded mapping iterator, yet the halves were pinned "
             f"({n.get('halves')}) or the scan failed:\n{r.file('scan.out')}")


def test_kernel_scan_matches_proc_on_debian_612(k612_vm: BootResult) -> None:
    """On 6.12 the mappings are walked in two halves that keep each process's summary
    (scan.bpf.c: known_clear), and the comparison, with its map/unmap/exec sequences
    after kept summaries, finds what the /proc scan finds."""
    r = ran(k612_vm, "bpfscan")
    n = r.notes()
    out = r.file("pytest.out")
    r.expect((n.get("kernel") or "").startswith("6.12."), f"booted {n.get('kernel')}")
    r.expect(n.get("pytest_rc") == "0", f"the comparison failed on {n.get('kernel')}:\n{out}")
    r.expect(" passed" in out and "skipped" not in out and "failed" not in out,
             f"the comparison did not run in full on {n.get('kernel')}:\n{out}")
    r.expect(n.get("scan_rc") == "0" and n.get("halves") == "1",
             f"the halves were not pinned on {n.get('kernel')}:\n{r.file('scan.out')}")
    r.expect((n.get("summaries") or "0").isdigit() and int(n.get("summaries") or "0") > 0,
             f"a scan kept no summary on {n.get('kernel')} ({n.get('summaries')!r}):\n"
             f"{r.file('scan.out')}")
