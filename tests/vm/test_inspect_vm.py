"""`safeusb inspect` on a real kernel with emulated USB sticks (the inspect issue's tier 3)."""

from __future__ import annotations

import pytest

from .harness import Boot, BootResult, Image, Runner, Scenario, Stick

pytestmark = pytest.mark.vm

BOOT = Boot(
    name="inspect",
    sticks=(
        Stick("idle", Image.ext4()),
    ),
    scenarios=(
        Scenario("idle", "inspect-idle.sh"),
    ),
)


@pytest.fixture(scope="module")
def vm(vm_runner: Runner, safeusb_cli: str) -> BootResult:
    return vm_runner.run(BOOT)


def test_idle_stick_is_free(vm: BootResult) -> None:
    r = vm.scenario("idle")
    r.expect_ran()
    run = r.inspect("idle")
    r.expect(run.rc == 0, f"idle stick: expected exit 0\n{run}")
    r.expect(run.json["free"] is True, f"idle stick not reported free\n{run}")
