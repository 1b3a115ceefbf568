"""The in-kernel scan on Debian 12's kernel (6.1): the BPF iterators load there (CO-RE,
from the object scripts/build-bpf built) and find what the /proc scan finds, field by
field (tests/host/test_bpfscan_compare_host.py, run in the guest on its loop devices)."""

from __future__ import annotations

import pytest

from .harness import Boot, BootResult, Runner, Scenario

pytestmark = pytest.mark.vm

BOOT = Boot(
    name="bpfscan",
    modules=("loop",),
    scenarios=(Scenario("compare", "bpfscan-compare.sh", timeout=300),),
)


@pytest.fixture(scope="module")
def vm(vm_runner: Runner, safeusb_cli: str) -> BootResult:
    return vm_runner.run(BOOT)


def test_kernel_scan_matches_proc_on_debian_kernel(vm: BootResult) -> None:
    r = vm.scenario("compare")
    r.expect_ran()
    n = r.notes()
    out = r.file("pytest.out")
    r.expect(n.get("pytest_rc") == "0", f"the comparison failed on {n.get('kernel')}:\n{out}")
    r.expect(" passed" in out and "skipped" not in out and "failed" not in out,
             f"the comparison did not run in full on {n.get('kernel')}:\n{out}")
