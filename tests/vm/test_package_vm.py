"""The .deb on a real kernel: installed into the guest with dpkg -i (a writable /usr
overlay), nothing of this checkout on its path; its hook guards `virsh start` after the
libvirtd restart it asks for; dpkg -r leaves no working hook and libvirt starts domains;
dpkg -P removes the rest. libvirt runs in whatever configuration guest/libvirt-up.sh
sets up. The stick refused at start is checked from outside afterwards."""

from __future__ import annotations

import json
from pathlib import Path

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
)
from tests.packaging import Packages, missing_tools
from tests.vm import REPO

pytestmark = pytest.mark.vm


def _deb(where: Path) -> Path:
    """The .deb, built from this checkout while the boot starts (tests/packaging.py)."""
    built = Packages(workdir=where)
    return built.deb


BOOT = Boot(
    name="package",
    libvirt=True,
    rw_overlays=("/usr",),  # dpkg installs below /usr; /etc and /var are overlays too
    safeusb_confinement=False,  # nothing of the checkout's installation in AppArmor
    nested_domain=False,  # the scenario defines the domains it starts
    files={"safeusb.deb": _deb},
    sticks=(Stick("dirty", Image.ext4()), Stick("idle", Image.ext4())),
    # dpkg reads its whole database over 9p and byte-compiles under emulation:
    # dpkg -i alone took 2.8 min on 2 cores under a load average of 14.
    scenarios=(Scenario("package", "package.sh", payloads={"data.bin": 4 * MIB},
                        timeout=720),),
    timeout=1080,
)


@pytest.fixture(scope="module")
def vm(vm_runner: Runner) -> BootResult:
    missing = missing_tools("deb")
    if missing:
        pytest.fail(f"cannot build the .deb: {', '.join(missing)} missing "
                    "(scripts/setup --test installs them)", pytrace=False)
    return vm_runner.run(BOOT)


@pytest.fixture(scope="module")
def run(vm: BootResult) -> tuple[ScenarioResult, dict[str, str]]:
    r = vm.scenario("package")
    r.expect_ran()
    return r, r.notes()


def test_dpkg_install_uses_nothing_of_the_checkout(
        run: tuple[ScenarioResult, dict[str, str]]) -> None:
    r, n = run
    r.expect(n.get("install_rc") == "0", f"dpkg -i failed:\n{r.file('dpkg-i.out')}")
    r.expect(n.get("status") == "install ok installed", f"dpkg status: {n.get('status')}")
    r.expect(n.get("hook_mode") == "root:root 755", f"hook: {n.get('hook_mode')}")
    r.expect(n.get("socket_enabled") == "1", "postinst did not enable safeusbd.socket")
    r.expect("restart it" in r.file("dpkg-i.out"),
             f"postinst did not say to restart libvirtd:\n{r.file('dpkg-i.out')}")
    r.expect(n.get("libvirtd_before") and n.get("libvirtd_after_install")
             == n.get("libvirtd_before"), f"libvirtd was restarted by the package ({n})")
    try:
        where = json.loads(r.file("syspath.json"))
    except ValueError:
        r.fail(f"python3 -c 'import safeusb' failed:\n{r.file('syspath.json')}")
    r.expect(where["file"] == "/usr/lib/python3/dist-packages/safeusb/__init__.py",
             f"safeusb imported from {where['file']}")
    r.expect(not [p for p in where["path"] if p.startswith(str(REPO))],
             f"the checkout is on sys.path: {where['path']}")
    r.expect(n.get("shebang") == "#! /usr/bin/python3" or n.get("shebang") == "#!/usr/bin/python3",
             f"/usr/bin/safeusb starts with {n.get('shebang')!r}")
    r.expect(n.get("inspect_rc") == "0",
             f"/usr/bin/safeusb inspect of the idle stick:\n{r.file('inspect.out')}")
    r.expect("safeusb install-confinement" in r.file("dpkg-i.out"),
             f"postinst did not say how to install the AppArmor rules:\n{r.file('dpkg-i.out')}")
    r.expect(n.get("confinement_rc") == "0" and n.get("confinement_names_checkout") == "0",
             f"the packaged install-confinement failed or named the checkout ({n}):\n"
             f"{r.file('confinement.out')}")
    r.expect(n.get("aa_parse_rc") == "0",
             f"libvirt's AppArmor domain template does not parse with safeusb's rules:\n"
             f"{r.file('aa.out')}")


def test_packaged_hook_refuses_the_mounted_stick(
        vm: BootResult, run: tuple[ScenarioResult, dict[str, str]]) -> None:
    r, n = run
    r.expect(n.get("restarted") == "0", f"libvirtd did not come back after its restart ({n})")
    r.expect(int(n.get("dirty_kb") or 0) >= 1024, f"4 MiB were not dirty before ({n})")
    refused = r.file("refused.out")
    r.expect(n.get("refused_rc") != "0" and "safeusb:" in refused and "/tmp/pk" in refused,
             f"virsh start was not refused by the packaged hook naming the mountpoint:\n"
             f"{refused}")
    r.expect(n.get("mounted_after_refusal") == "1"
             and int(n.get("dirty_kb_after_refusal") or 0) >= 1024,
             f"the refusal changed the stick ({n})")
    check = vm.check_stick("dirty", {"data.bin": ("package", "data.bin")})
    r.expect(check.intact, "image not intact after the refused start:\n" + check.summary())


def test_packaged_gate_refuses_a_live_attach_of_the_mounted_stick(
        run: tuple[ScenarioResult, dict[str, str]]) -> None:
    """The package's safeusbd and gate: a protected domain running as libvirt-qemu under
    AppArmor; `virsh attach-device --live` of the mounted stick is refused with the
    reason and the stick stays mounted with its data unwritten."""
    r, n = run
    r.expect(n.get("protect_rc") == "0" and n.get("protected_start_rc") == "0"
             and n.get("protected_emulator", "").startswith("/usr/local/lib/safeusb/gate/")
             and n.get("protected_user") == "libvirt-qemu",
             f"the domain did not run behind the packaged gate ({n})\n"
             f"{r.file('protect.out')}{r.file('protected-start.out')}")
    live = r.file("live.out")
    r.expect(n.get("live_rc") != "0" and "safeusb:" in live and "/tmp/pk" in live,
             f"the live attach was not refused naming the mountpoint:\n{live}\n"
             f"--- safeusbd\n{r.file('safeusbd.log')}")
    r.expect(n.get("mounted_after_live") == "1" and n.get("live_in_domain") == "0"
             and int(n.get("dirty_kb_after_live") or 0) >= 1024,
             f"the refused attach changed the stick or the domain ({n})")
    r.expect(n.get("unprotect_rc") == "0", r.file("unprotect.out"))


def test_packaged_hook_lets_the_idle_stick_go_and_gives_it_back(
        run: tuple[ScenarioResult, dict[str, str]]) -> None:
    r, n = run
    r.expect(n.get("idle_rc") == "0",
             f"virsh start with the idle stick failed:\n{r.file('idle.out')}")
    r.expect(n.get("idle_present_while_running") == "0",
             f"the idle stick's disk stayed on the host while the domain ran ({n})")
    r.expect(n.get("idle_back") == "1" and n.get("records_after_destroy") == "0",
             f"destroy did not give the stick back ({n})\n{r.file('idle-destroy.out')}")


def test_dpkg_remove_leaves_no_working_hook_and_purge_the_rest(
        run: tuple[ScenarioResult, dict[str, str]]) -> None:
    r, n = run
    r.expect(n.get("remove_rc") == "0", f"dpkg -r failed:\n{r.file('dpkg-r.out')}")
    r.expect(n.get("status_removed") == "deinstall ok config-files",
             f"after dpkg -r: {n.get('status_removed')}")
    r.expect(n.get("package_dir_removed") == "1" and n.get("cli_removed") == "1",
             f"dpkg -r left code behind ({n})")
    # The drop-in is a conffile (kept until purge); with its package gone it does nothing.
    r.expect(n.get("hook_removed_rc") == "0" and not r.file("hook-removed.out").strip(),
             f"the kept drop-in still acts (exit {n.get('hook_removed_rc')}):\n"
             f"{r.file('hook-removed.out')}")
    r.expect(n.get("idle_removed_rc") == "0",
             f"libvirt does not start a domain with a USB device after dpkg -r:\n"
             f"{r.file('idle-removed.out')}")
    r.expect(n.get("libvirtd_after_remove") == n.get("libvirtd_restarted"),
             f"libvirtd was restarted by dpkg -r ({n})")
    r.expect(n.get("purge_rc") == "0", f"dpkg -P failed:\n{r.file('dpkg-p.out')}")
    r.expect(n.get("status_purged", "").startswith("pn") or "no packages found"
             in n.get("status_purged", ""), f"after dpkg -P: {n.get('status_purged')}")
    r.expect(n.get("hook_after_purge") == "0" and n.get("aa_after_purge") == "0"
             and n.get("socket_after_purge") == "0", f"dpkg -P left files behind ({n})")
    r.expect(n.get("plain_purged_rc") == "0",
             f"libvirt does not start domains after dpkg -P:\n{r.file('plain-purged.out')}")
