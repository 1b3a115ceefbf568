#!/usr/bin/env python3
"""Benchmark: what the kernel guard (safeusb guard) costs, on the real kernel.

Boots the real-kernel VM (safeusb.lab harness; root, `scripts/setup-vm-tier` first) with one
idle stick and prints, with the guard off and then on (medians in one run): usbfs ioctls
(one the guard looks at and lets pass, one it never inspects), a write(2) (every write
passes its file_permission hook), an idle stick's `safeusb prepare` + `release` (the
handover marks itself to the guard); and the guard's load and attach time, the installed
object's size and the loaded programs' sizes. Figures under QEMU's software emulation (TCG)
are several times slower than on hardware; compare on with off.
Run: sudo .venv/bin/python benchmarks/guard_cost.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from safeusb.host import guard  # noqa: E402
from safeusb.lab import harness  # noqa: E402
from tests.vm import GUEST_DIR  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    boot = harness.Boot(
        name="bench-guard",
        sticks=(harness.Stick("bench", harness.Image.ext4()),),
        scenarios=(harness.Scenario("bench", "bench-guard.sh", timeout=600),),
    )
    res = harness.run_boot(boot, GUEST_DIR)
    try:
        if res.error:
            print(f"benchmark: the VM run failed: {res.error}", file=sys.stderr)
            return 1
        sc = res.scenario("bench")
        if sc.file("enable.rc").strip() != "0":
            print(f"benchmark: the guard did not enable: {sc.file('enable.err')[-2000:]}",
                  file=sys.stderr)
            return 1
        errors = sc.file("errors").strip()
        if errors:
            print(f"benchmark: errors in the guest:\n{errors[-2000:]}", file=sys.stderr)
            return 1
        off = json.loads(sc.file("ioctl-off.json"))
        on = json.loads(sc.file("ioctl-on.json"))
        m = re.search(r"load ([\d.]+) s, attach ([\d.]+) s, object (\d+) bytes",
                      sc.file("enable.out"))
        progs = [p for p in json.loads(sc.file("progs.json") or "[]")
                 if p.get("name", "").startswith("guard_")]
        print("kernel guard cost (Debian 6.1 under TCG; medians)")
        if m:
            print(f"  load {float(m[1]) * 1000:.0f} ms, attach {float(m[2]) * 1000:.0f} ms")
        print(f"  installed object {guard.OBJECT.name}: {guard.OBJECT.stat().st_size} bytes "
              f"(in the VM: {m[3] if m else '?'} bytes)")
        for p in progs:
            print(f"  loaded {p['name']}: {p.get('bytes_xlated')} bytes translated, "
                  f"{p.get('bytes_jited')} bytes JITed")
        print(f"  {'':32} {'off µs':>8} {'on µs':>8} {'added µs':>9}")
        for key, label in (("get_capabilities", "usbfs GET_CAPABILITIES ioctl"),
                           ("ioctl_connect", "usbfs USBDEVFS_IOCTL (CONNECT)"),
                           ("write_dev_null", "write(2) of 1 byte to /dev/null")):
            print(f"  {label:32} {off[key] / 1000:>8.2f} {on[key] / 1000:>8.2f} "
                  f"{(on[key] - off[key]) / 1000:>+9.2f}")
        print(f"  {'usbfs DISCONNECT refused (EBUSY)':32} {'-':>8} "
              f"{on['ioctl_disconnect_refused'] / 1000:>8.2f}")
        rounds: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
        for line in sc.file("rounds").splitlines():
            tag, t0, t1, t2 = line.split()
            rounds[tag].append((float(t1) - float(t0), float(t2) - float(t1)))
        for i, what in enumerate(("idle stick: safeusb prepare", "idle stick: safeusb release")):
            a = statistics.median(r[i] for r in rounds["off"])
            b = statistics.median(r[i] for r in rounds["on"])
            print(f"  {what:32} {a * 1000:>7.0f}ms {b * 1000:>7.0f}ms {(b - a) * 1000:>+8.0f}ms")
        return 0
    finally:
        if args.keep:
            print(f"kept {res.workdir}")
        else:
            shutil.rmtree(res.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
