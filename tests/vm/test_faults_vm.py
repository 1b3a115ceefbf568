"""Faults on a real kernel: a flush that cannot finish in time, and umount failing with
EBUSY in the middle of prepare. Every image is checked from outside afterwards."""

from __future__ import annotations

import json

import pytest

from .harness import MIB, Boot, BootResult, Image, Runner, Scenario, Stick

pytestmark = pytest.mark.vm

BOOT = Boot(
    name="faults",
    sticks=(
        Stick("slow", Image.ext4(), write_bps=256 * 1024),
        Stick("busy", Image.ext4(), write_bps=1024 * 1024),
    ),
    scenarios=(
        Scenario("timeout", "fault-timeout.sh", payloads={"data.bin": 4 * MIB}),
        Scenario("ebusy", "fault-ebusy.sh", payloads={"data.bin": 4 * MIB}),
    ),
)


@pytest.fixture(scope="module")
def vm(vm_runner: Runner, safeusb_cli: str) -> BootResult:
    return vm_runner.run(BOOT)


@pytest.mark.fault
def test_flush_timeout_refuses_and_keeps_everything(vm: BootResult) -> None:
    r = vm.scenario("timeout")
    r.expect_ran()
    n = r.notes()
    r.expect(int(n.get("dirty_kb") or 0) >= 1024, f"nothing was dirty ({n})")
    out = json.loads(r.file("prepare.out"))
    r.expect(r.file("prepare.rc").strip() == "1" and not out["ok"]
             and "did not finish in 2 s" in (out["error"] or "")
             and out["host_state"] == "unchanged: nothing was done",
             f"expected a refusal after the flush timeout:\n{json.dumps(out, indent=1)}")
    r.expect(n.get("mounted_after") == "1" and n.get("disk_after") == "1",
             f"the stick was not left mounted and present ({n})")
    check = vm.check_stick("slow", {"data.bin": ("timeout", "data.bin")})
    r.expect(check.intact, check.summary())


@pytest.mark.fault
def test_ebusy_midway_rolls_back(vm: BootResult) -> None:
    r = vm.scenario("ebusy")
    r.expect_ran()
    n = r.notes()
    out = json.loads(r.file("prepare.out") or "{}")
    r.expect(r.file("prepare.rc").strip() == "1" and not out.get("ok")
             and "busy" in (out.get("error") or "").lower(),
             f"expected umount to fail with EBUSY:\n{json.dumps(out, indent=1)}\n"
             f"{r.file('prepare.err')}")
    r.expect(out["undone"] and all(u.startswith("unmount ") for u in out["undone"])
             and out["host_state"] == "as before: every step was undone",
             f"expected the unmounts done before the failure to be undone:\n"
             f"{json.dumps(out, indent=1)}")
    r.expect(n.get("mounted_a") == "1" and n.get("mounted_b") == "1"
             and n.get("disk_after") == "1", f"the host is not as before ({n})")
    check = vm.check_stick("busy", {"data.bin": ("ebusy", "data.bin")})
    r.expect(check.intact, check.summary())
