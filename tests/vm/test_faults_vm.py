"""Faults on a real kernel: a flush that cannot finish in time, and umount failing with
EBUSY in the middle of prepare. Every image is checked from outside afterwards."""

from __future__ import annotations

import json

import pytest

from safeusb.lab.harness import MIB, Boot, BootResult, Image, Runner, Scenario, Stick

pytestmark = pytest.mark.vm

BOOT = Boot(
    name="faults",
    alone=True,  # an intruder between the flush and the last unmount: a window of its own
    sticks=(
        Stick("slow", Image.ext4(), write_bps=256 * 1024),
        Stick("busy", Image.ext4(), write_bps=1024 * 1024),
        Stick("pulled", Image.ext4(), write_bps=1024 * 1024),
        Stick("full", Image.ext4()),
    ),
    scenarios=(
        Scenario("timeout", "fault-timeout.sh", payloads={"data.bin": 4 * MIB}),
        Scenario("ebusy", "fault-ebusy.sh", payloads={"data.bin": 4 * MIB}),
        # Enough that the flush still runs when prepare gets there and the pull comes.
        Scenario("pull", "fault-pull.sh",
                 payloads={"before.bin": 1 * MIB, "data.bin": 16 * MIB}),
        Scenario("runfull", "fault-runfull.sh", payloads={"data.bin": 2 * MIB}),
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


@pytest.mark.fault
def test_stick_pulled_mid_flush_is_reported_not_hidden(vm: BootResult) -> None:
    """The stick leaves in the middle of the flush (device_del on the outer QEMU):
    prepare fails at once naming the removal and the unwritten amount; what was synced
    before is intact on the image and its filesystem is consistent."""
    r = vm.scenario("pull")
    r.expect_ran()
    n = r.notes()
    answer = vm.share / "out" / "pull" / "PULLED.done"
    r.expect(n.get("pulled") == "1", f"the stick was not pulled ({n}); the host said: "
             f"{answer.read_text().strip() if answer.exists() else 'nothing'}")
    r.expect(int(n.get("left_at_pull_kb") or 0) >= 1024,
             f"the pull did not come in the middle of the flush ({n})")
    out = json.loads(r.file("prepare.out") or "{}")
    err = out.get("error") or ""
    r.expect(r.file("prepare.rc").strip() == "1" and not out.get("ok")
             and "removed from the host during the flush" in err
             and "not yet written" in err and "lost" in err,
             f"expected prepare to fail saying the stick left with data unwritten:\n"
             f"{json.dumps(out, indent=1)}\n{r.file('prepare.err')}")
    r.expect(not any(d.startswith("unmount") for d in out.get("done", [])),
             f"prepare went on after the device left:\n{json.dumps(out, indent=1)}")
    check = vm.check_stick("pulled", {"before.bin": ("pull", "before.bin"),
                                      "data.bin": ("pull", "data.bin")})
    before = next(f for f in check.files if f.path == "before.bin")
    r.expect(check.mount_error is None and check.fsck_rc == 0 and before.status == "ok",
             f"what was synced before the pull did not survive: {check.summary()}")
    data = next(f for f in check.files if f.path == "data.bin")
    print(f"pull: data.bin on the image after the pull: {data.status} "
          f"({data.size} of {data.expected_size} bytes); safeusb said: {err}")


@pytest.mark.fault
def test_run_full_refuses_with_the_reason_and_keeps_everything(vm: BootResult) -> None:
    """/run/safeusb on a full filesystem: the record release needs cannot be written, so
    nothing is done; with room for one record only, what was done is undone."""
    r = vm.scenario("runfull")
    r.expect_ran()
    n = r.notes()
    for tag, state in (("full", "unchanged: nothing was done"),
                       ("onepage", "as before: every step was undone")):
        out = json.loads(r.file(f"{tag}.out") or "{}")
        r.expect(r.file(f"{tag}.rc").strip() == "1" and not out.get("ok")
                 and "No space left on device" in (out.get("error") or "")
                 and out.get("host_state") == state,
                 f"{tag}: expected a failure naming the full /run, host {state}:\n"
                 f"{json.dumps(out, indent=1)}\n{r.file(f'{tag}.err')}")
        r.expect(n.get(f"mounted_{tag}") == "1" and n.get(f"intact_{tag}") == "1"
                 and n.get(f"record_{tag}") == "0", f"{tag}: the host is not as before ({n})")
    r.expect(n.get("released") == "0" and n.get("remounted") == "1",
             f"with room again, prepare and release did not work ({n})")
    check = vm.check_stick("full", {"data.bin": ("runfull", "data.bin")})
    r.expect(check.intact, check.summary())
