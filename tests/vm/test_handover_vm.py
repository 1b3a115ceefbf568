"""prepare/release and the libvirt hook on a real kernel (the plan/act and hook issues).

One boot with libvirtd and safeusb's hook installed as a qemu.d drop-in before libvirtd
starts; a stick per scenario. Every image that can be read from outside (ext4, no
device-mapper) is checked here afterwards: files intact, fsck clean.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from safeusb.install import render
from safeusb.lab.harness import (
    MIB,
    Boot,
    BootResult,
    Image,
    Partition,
    Runner,
    Scenario,
    ScenarioResult,
    Stick,
    check_image,
)
from tests.vm import REPO

pytestmark = pytest.mark.vm


def _boot(hook: str) -> Boot:
    return Boot(
        name="handover",
        alone=True,  # handover-race.sh races a mount against prepare's hold
        libvirt=True,
        libvirt_hooks={"qemu.d/safeusb": hook},
        sticks=(
            Stick("give", Image.ext4()),
            Stick("keep", Image.ext4()),
            Stick("race", Image.ext4()),
            Stick("hk", Image.ext4()),
            Stick("luks", Image.msdos(Partition(1, 62, fs="none"))),
            Stick("lvm", Image.raw()),
            Stick("swap", Image.raw()),
            Stick("md", Image.msdos(Partition(1, 31, fs="none"), Partition(32, 31, fs="none"))),
        ),
        scenarios=(
            Scenario("give", "handover-give.sh", payloads={"data.bin": 4 * MIB}),
            Scenario("keep", "handover-keep.sh", payloads={"data.bin": 4 * MIB}),
            Scenario("race", "handover-race.sh", payloads={"data.bin": 4 * MIB}),
            Scenario("hook", "handover-hook.sh", payloads={"data.bin": 4 * MIB}, timeout=300),
            Scenario("luks", "handover-luks.sh", payloads={"data.bin": 2 * MIB}),
            Scenario("lvm", "handover-lvm.sh", payloads={"data.bin": 2 * MIB}),
            Scenario("swap", "handover-swap.sh"),
            Scenario("md", "handover-md.sh", payloads={"data.bin": 2 * MIB}),
        ),
        modules=("xhci_pci", "usb_storage", "sd_mod", "dm_mod", "dm_crypt"),
    )


# The drop-in as install-hook renders it for this checkout's interpreter.
BOOT = _boot(render(str(REPO / ".venv" / "bin" / "python3")))


@pytest.fixture(scope="module")
def vm(vm_runner: Runner, safeusb_cli: str) -> BootResult:
    return vm_runner.run(BOOT)


def ran(vm: BootResult, name: str) -> tuple[ScenarioResult, dict[str, str]]:
    r = vm.scenario(name)
    r.expect_ran()
    return r, r.notes()


def step_json(r: ScenarioResult, tag: str) -> dict[str, Any]:
    rc = r.file(f"{tag}.rc").strip()
    try:
        data: dict[str, Any] = json.loads(r.file(f"{tag}.out"))
    except ValueError:
        r.fail(f"safeusb {tag}: exit {rc}, no JSON\n{r.file(f'{tag}.out')}\n"
               f"{r.file(f'{tag}.err')}")
    return data


def kinds(done: list[str]) -> list[str]:
    """The first word of each step done, repeats folded (a flush per statistics device)."""
    out: list[str] = []
    for d in done:
        word = d.split()[0]
        if not out or out[-1] != word:
            out.append(word)
    return out


def test_unmount_policy_hands_over_and_release_gives_back(vm: BootResult) -> None:
    r, n = ran(vm, "give")
    r.expect(int(n.get("dirty_kb") or 0) >= 1024, f"4 MiB were not dirty before ({n})")
    prep = step_json(r, "prepare")
    r.expect(prep["ok"] and kinds(prep["done"]) == ["flush", "unmount", "hold"],
             f"prepare did not flush, unmount and hand over:\n{json.dumps(prep, indent=1)}\n"
             f"{r.file('prepare.err')}")
    r.expect(n.get("mounted_after_prepare") == "0" and n.get("disk_after_prepare") == "0",
             f"after prepare the stick is still mounted or present ({n})")
    r.expect(n.get("state_mode") == "600", f"state file mode is not 0600 ({n})")
    r.expect(n.get("attach_rc") == "0", f"virsh attach-device failed:\n{r.file('attach.out')}")
    r.expect(n.get("detach_rc") == "0", f"virsh detach-device failed:\n{r.file('detach.out')}")
    rel = step_json(r, "release")
    r.expect(rel["ok"], f"release failed:\n{json.dumps(rel, indent=1)}\n{r.file('release.err')}")
    r.expect(n.get("mounted_after_release") == "1" and n.get("readback") == n.get("payload"),
             f"release did not remount with the data ({n})")
    check = vm.check_stick("give", {"data.bin": ("give", "data.bin")})
    r.expect(check.intact, "image not intact after prepare, attach, detach, release:\n"
             + check.summary())


def test_refuse_policy_changes_nothing(vm: BootResult) -> None:
    r, n = ran(vm, "keep")
    r.expect(r.file("prepare.rc").strip() == "1", f"expected exit 1\n{r.file('prepare.err')}")
    err = r.file("prepare.err")
    r.expect("mounted at /tmp/keep" in err and "not yet written" in err
             and 'set mount = "unmount"' in err, f"refusal does not say why and what to do:\n{err}")
    r.expect(n.get("mounted_after") == "1" and n.get("disk_after") == "1",
             f"a refusal changed the host ({n})")
    r.expect(int(n.get("dirty_kb_after") or 0) >= 1024,
             f"a refusal flushed anyway: refuse must change nothing ({n})")
    check = vm.check_stick("keep", {"data.bin": ("keep", "data.bin")})
    r.expect(check.intact, check.summary())


@pytest.mark.race
def test_mount_attempts_racing_prepare(vm: BootResult) -> None:
    r, n = ran(vm, "race")
    prep = step_json(r, "prepare")
    r.expect(prep["ok"], f"prepare failed under a mounting racer:\n{json.dumps(prep, indent=1)}"
             f"\n{r.file('prepare.err')}")
    end = float(r.file("prepare.end"))
    attempts = [line.split() for line in r.file("racer.log").splitlines() if line.strip()]
    after = [a for a in attempts if float(a[0]) > end]
    r.expect(after and all(a[1] == "failed" for a in after),
             f"mount attempts after prepare: {after[:5]}")
    r.expect(n.get("mounted_a") == "0" and n.get("mounted_b") == "0"
             and n.get("disk_after") == "0", f"the stick is still mounted or present ({n})")
    holds = [line for line in r.file("prepare.err").splitlines() if "hold /dev/" in line]
    r.expect(holds, f"prepare never held the device\n{r.file('prepare.err')}")
    check = vm.check_stick("race", {"data.bin": ("race", "data.bin")})
    r.expect(check.intact, check.summary())


def test_hook_guards_virsh_start(vm: BootResult) -> None:
    r, n = ran(vm, "hook")
    r.expect(n.get("plain_rc") == "0", f"a domain without USB did not start:\n"
             f"{r.file('plain.out')}")
    refused = r.file("refused.out")
    r.expect(n.get("refused_rc") != "0" and "/tmp/hk" in refused and "safeusb" in refused,
             f"virsh start of a domain with the mounted stick was not refused by name:\n"
             f"{refused}")
    r.expect(n.get("mounted_after_refusal") == "1"
             and int(n.get("dirty_kb_after_refusal") or 0) >= 1024,
             f"the refusal changed the host ({n})")
    r.expect(n.get("started_rc") == "0", f"with mount='unmount' in the metadata the domain "
             f"did not start:\n{r.file('started.out')}")
    r.expect(n.get("state_after_restart") in ("running", "paused"),
             f"after a libvirtd restart the guest is gone ({n})")
    r.expect(n.get("mounted_while_running") == "0" and n.get("in_domain") == "1",
             f"the stick was not handed to the running domain ({n})")
    r.expect(n.get("detach_rc") == "0" and n.get("in_domain_after_detach") == "0",
             f"virsh detach-device --live failed:\n{r.file('detach.out')}")
    r.expect(n.get("mounted_after_destroy") == "1" and n.get("readback") == n.get("payload")
             and n.get("record_after_destroy") == "0",
             f"destroy of the domain whose XML no longer names the stick did not give it "
             f"back, remounted with its data, from the records ({n})")
    big = r.file("big.out")
    r.expect(n.get("metadata_rc") == "0" and int(n.get("big_xml_bytes") or 0) > 6 * MIB,
             f"the domain did not grow past 6 MiB ({n}):\n{r.file('metadata.out')}")
    r.expect(n.get("big_rc") != "0" and "/tmp/hk" in big and "safeusb" in big,
             f"virsh start of a domain with 6 MiB of metadata and the mounted stick was not "
             f"refused by name:\n{big}")
    r.expect(n.get("mounted_after_big") == "1"
             and int(n.get("dirty_kb_after_big") or 0) >= 1024,
             f"the refusal of the big domain changed the host ({n})")
    check = vm.check_stick("hk", {"data.bin": ("hook", "data.bin"),
                                  "data2.bin": ("hook", "data.bin")})
    r.expect(check.intact, check.summary())


def test_luks_on_a_partition(vm: BootResult) -> None:
    r, n = ran(vm, "luks")
    prep = step_json(r, "prepare")
    r.expect(prep["ok"] and kinds(prep["done"]) == ["flush", "unmount", "close", "hold"],
             f"expected flush, unmount, close dm-crypt, hand over:\n"
             f"{json.dumps(prep, indent=1)}\n{r.file('prepare.err')}")
    r.expect(n.get("mapping_after") == "0" and n.get("disk_after") == "0", f"({n})")
    rel = step_json(r, "release")
    r.expect(any("needs its key" in x for x in rel["not_undone"]),
             f"release should say the mapping needs its key:\n{json.dumps(rel, indent=1)}")
    r.expect(n.get("readback") == n.get("payload"),
             f"data in the LUKS volume differs after the handover ({n})")


def test_lvm_volume(vm: BootResult) -> None:
    r, n = ran(vm, "lvm")
    prep = step_json(r, "prepare")
    r.expect(prep["ok"] and kinds(prep["done"]) == ["flush", "unmount", "deactivate", "hold"],
             f"expected flush, unmount, deactivate LV, hand over:\n"
             f"{json.dumps(prep, indent=1)}\n{r.file('prepare.err')}")
    r.expect(n.get("lv_after") == "0" and n.get("disk_after") == "0", f"({n})")
    rel = step_json(r, "release")
    r.expect(rel["ok"] and n.get("mounted_after_release") == "1"
             and n.get("readback") == n.get("payload"),
             f"release did not reactivate and remount the volume with its data ({n})\n"
             f"{json.dumps(rel, indent=1)}\n{r.file('release.err')}")


def test_md_mirror_on_its_partitions(vm: BootResult) -> None:
    """raid1 over the stick's two partitions: stopped for the guest, reassembled whole
    (not degraded) and remounted on release; each half holds the data and a clean
    filesystem, read from outside."""
    r, n = ran(vm, "md")
    prep = step_json(r, "prepare")
    r.expect(prep["ok"] and [k for k in kinds(prep["done"]) if k != "flush"]
             == ["unmount", "stop", "hold"],
             f"expected unmount, stop the array, hand over:\n{json.dumps(prep, indent=1)}\n"
             f"{r.file('prepare.err')}")
    r.expect(n.get("md_after") == "0" and n.get("disk_after") == "0", f"({n})")
    rel = step_json(r, "release")
    r.expect(rel["ok"] and rel["host_state"] == "given back"
             and n.get("mounted_after_release") == "1"
             and n.get("raid_disks") == "2" and n.get("degraded") == "0"
             and n.get("readback") == n.get("payload"),
             f"release did not reassemble both halves and remount with the data ({n})\n"
             f"{json.dumps(rel, indent=1)}\n{r.file('release.err')}\n"
             f"{r.file('mdstat-after-release')}")
    offset, size = int(n["offset_kb"]) * 1024, int(n["size_kb"]) * 1024
    for start_mib in (1, 32):
        check = check_image(vm.image("md"), {"data.bin": vm.payload_sums["md"]["data.bin"]},
                            offset=start_mib * MIB + offset, size=size)
        r.expect(check.intact, f"half at {start_mib} MiB: {check.summary()}")


def test_swap_on_the_stick(vm: BootResult) -> None:
    r, n = ran(vm, "swap")
    prep = step_json(r, "prepare")
    r.expect(prep["ok"] and "swapoff" in kinds(prep["done"]),
             f"expected swapoff:\n{json.dumps(prep, indent=1)}\n{r.file('prepare.err')}")
    r.expect(n.get("swaps_before") == "1" and n.get("swaps_after") == "0"
             and n.get("disk_after") == "0", f"({n})")
    r.expect(n.get("swaps_after_release") == "1", f"release did not swapon again ({n})\n"
             f"{r.file('release.out')}{r.file('release.err')}")
