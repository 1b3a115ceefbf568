#!/usr/bin/env python3
"""Benchmark: `virsh attach-device --live` of an idle USB stick into a running guest, without
and with the hotplug gate (`safeusb protect`), on the real-kernel VM (tests/vm harness;
root, `scripts/setup-vm-tier` first). Prints the median of five attaches each.

With the gate, the attach includes `safeusb prepare` of the stick (inspect, flush, hold,
unbind), run by the gate before QEMU sees the request. Under QEMU's software emulation
that Python run dominates; the figure on real hardware is smaller.
Run: sudo .venv/bin/python benchmarks/gate_attach.py
"""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.vm import harness  # noqa: E402


def main() -> int:
    boot = harness.Boot(
        name="bench-gate",
        libvirt=True,
        rw_overlays=("/usr/local/lib",),
        sticks=(harness.Stick("idle", harness.Image.ext4()),),
        scenarios=(harness.Scenario("bench", "bench-gate.sh", timeout=600),),
    )
    res = harness.run_boot(boot)
    try:
        if res.error:
            print(f"benchmark: the VM run failed: {res.error}", file=sys.stderr)
            return 1
        sc = res.scenario("bench")
        times: dict[str, list[float]] = {}
        for line in sc.file("times").splitlines():
            label, seconds = line.split()
            times.setdefault(label, []).append(float(seconds))
        if "attach failed" in sc.file("direct.log") + sc.file("gate.log"):
            print("some attaches failed:\n" + sc.file("direct.log") + sc.file("gate.log"))
        direct = statistics.median(times.get("direct", [0.0]))
        gate = statistics.median(times.get("gate", [0.0]))
        print(f"{'virsh attach-device --live, idle stick':<42} {'median s':>9}  samples")
        for label, key, med in (("without the gate", "direct", direct),
                                ("through the gate", "gate", gate)):
            samples = " ".join(f"{t:.2f}" for t in times.get(key, []))
            print(f"{label:<42} {med:>9.3f}  {samples}")
        print(f"{'added by the gate (prepare included)':<42} {gate - direct:>+9.3f}")
        print("goal: <= 0.100 s added")
        return 0
    finally:
        shutil.rmtree(res.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
