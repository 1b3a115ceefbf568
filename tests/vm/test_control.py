"""The control: without safeusb, a live attach of a mounted stick loses data.

This proves the harness can see loss. If it stops reproducing, the test says so:
every "nothing lost" result of the tier would then prove nothing.
"""

from __future__ import annotations

import pytest

from safeusb.lab.harness import MIB, Boot, BootResult, Image, Runner, Scenario, Stick

pytestmark = pytest.mark.vm

BOOT = Boot(
    name="control",
    libvirt=True,
    sticks=(Stick("clean", Image.ext4()), Stick("stick", Image.ext4())),
    scenarios=(
        Scenario("clean", "control-clean.sh", payloads={"data.bin": 4 * MIB}),
        Scenario("attach-dirty", "control-attach.sh",
                 payloads={"base.bin": 1 * MIB, "data.bin": 4 * MIB}),
    ),
)


@pytest.fixture(scope="module")
def vm(vm_runner: Runner) -> BootResult:
    return vm_runner.run(BOOT)


def test_nested_domain_running(vm: BootResult) -> None:
    if "domain_started" not in vm.timings:
        log = (vm.share / "out" / "libvirt.log")
        pytest.fail(vm.boot_report("libvirtd or the nested domain g1 did not start\n"
                                   + (log.read_text() if log.exists() else "")), pytrace=False)


def test_clean_attach_loses_nothing(vm: BootResult) -> None:
    r = vm.scenario("clean")
    r.expect_ran()
    r.expect(r.notes().get("attach_rc") == "0", f"virsh attach-device failed\n{r.stdout}")
    check = vm.check_stick("clean", {"data.bin": ("clean", "data.bin")})
    r.expect(check.intact, f"unmounted before attach, yet the image is not intact:\n"
                           f"{check.summary()}")


def test_live_attach_of_dirty_mounted_stick_loses_data(vm: BootResult) -> None:
    r = vm.scenario("attach-dirty")
    r.expect_ran()
    n = r.notes()
    r.expect(int(n.get("dirty_kb") or 0) >= 1024,
             f"the 4 MiB were not left dirty before the attach ({n})")
    r.expect(n.get("attach_rc") == "0" and "attached successfully" in r.file("attach.out"),
             f"virsh attach-device did not report success:\n{r.file('attach.out')}")
    check = vm.check_stick("stick", {"base.bin": ("attach-dirty", "base.bin"),
                                     "data.bin": ("attach-dirty", "data.bin")})
    base = next(f for f in check.files if f.path == "base.bin")
    r.expect(base.status == "ok",
             f"data synced before the attach is damaged: the check itself is suspect\n"
             f"{check.summary()}")
    r.expect(not check.intact,
             "the loss did not reproduce: a live attach of a mounted stick with 4 MiB dirty "
             "left an intact image, so this tier can no longer show loss\n" + check.summary())


def test_a_guest_that_does_not_start_the_driver_is_killed_and_booted_again(
        vm_runner: Runner) -> None:
    """The harness's guard against a kernel that stops in its own boot: given two seconds
    to start the driver (a guest is ready at about twelve), the real VM is killed, booted
    once more, killed again, and the boot's result says both: the guard's error, not the
    boot timeout's."""
    from safeusb.lab import harness  # noqa: PLC0415

    boot = Boot(name="never-ready", scenarios=())
    with vm_runner.slot():
        res = harness.run_boot(boot, vm_runner.scenario_dir, ready_within=2)
    try:
        assert res.error == "the guest did not start the driver within 2 s", res.error
        assert res.retried and "did not start the driver" in res.retried
        assert "driver_start" not in res.timings
    finally:
        harness.shutil.rmtree(res.workdir, ignore_errors=True)
