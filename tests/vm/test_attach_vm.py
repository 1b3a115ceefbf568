"""`safeusb attach-device` on a real kernel, against plain `virsh attach-device --live`:
the boot `safeusb demo` shows."""

from __future__ import annotations

import json

import pytest

from safeusb.demo import demo_boot
from safeusb.lab.harness import BootResult, Runner

pytestmark = pytest.mark.vm

BOOT = demo_boot()


@pytest.fixture(scope="module")
def vm(vm_runner: Runner, safeusb_cli: str) -> BootResult:
    return vm_runner.run(BOOT)


def test_plain_libvirt_loses_the_fresh_data(vm: BootResult) -> None:
    r = vm.scenario("plain")
    r.expect_ran()
    n = r.notes()
    r.expect(n.get("attach_rc") == "0", f"virsh attach-device failed\n{r.file('attach.out')}")
    check = vm.check_stick("plain", {"data.bin": ("plain", "data.bin")})
    r.expect(not check.intact, "the loss did not reproduce\n" + check.summary())


def test_safeusb_attach_device_refuses_then_hands_over_safely(vm: BootResult) -> None:
    r = vm.scenario("guarded")
    r.expect_ran()
    n = r.notes()
    refused = r.file("refused.out")
    r.expect(n.get("refused_rc") == "1" and "mounted at /tmp/su-guarded" in refused
             and "not yet written" in refused,
             f"expected a refusal (exit 1) naming the mountpoint and the unwritten data\n"
             f"{n}\n{refused}")
    r.expect(n.get("mounted_after_refusal") == "1", f"the refusal changed the host ({n})")
    r.expect(n.get("attach_rc") == "0" and "attached successfully" in r.file("attach.out"),
             f"with mount = \"unmount\" the attach failed\n{r.file('attach.out')}")
    r.expect(n.get("mounted_after") == "0"
             and int(n.get("in_domain", 0)) == int(n.get("in_domain_before", -1)) + 1,
             f"the stick did not go to the guest unmounted ({n})")
    check = vm.check_stick("guarded", {"data.bin": ("guarded", "data.bin")})
    r.expect(check.intact, "safeusb attach-device lost data\n" + check.summary())


def test_status_on_the_real_kernel(vm: BootResult) -> None:
    r = vm.scenario("guarded")
    r.expect_ran()
    n = r.notes()
    r.expect(n.get("status_rc") == "0", f"safeusb status failed\n{r.file('status.err')}")
    doc = json.loads(r.file("status.json"))
    sticks = {d["serial"]: d for d in doc["devices"] if d["vendor_id"] == "46f4"}
    guarded = next(d for s, d in sticks.items() if s.endswith("GUARDED"))
    plain = next(d for s, d in sticks.items() if s.endswith("PLAIN"))
    r.expect(guarded["safe_to_hand_over"] is False and "mounted at /tmp/su-guarded"
             in guarded["uses"], f"status of the mounted stick:\n{json.dumps(guarded)}")
    r.expect({"name": "g1", "state": "running"} in plain["domains"],
             f"the stick attached to g1 does not show g1:\n{json.dumps(plain)}")
    r.expect(any(d["hub"] for d in doc["devices"]) and doc["usb"] is True,
             f"no hubs in the tree\n{r.file('status.out')}")
    text = r.file("status.out")
    r.expect("NOT safe: mounted at /tmp/su-guarded" in text and "libvirt: connected to" in text,
             f"status text:\n{text}")
