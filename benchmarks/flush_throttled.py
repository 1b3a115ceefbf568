#!/usr/bin/env python3
"""Benchmark: how long `safeusb prepare` takes to flush a stick QEMU throttles for writes,
against dirty bytes / bandwidth (goal: within 10 % plus 100 ms).

Boots the real-kernel VM (safeusb.lab harness; root, `scripts/setup-vm-tier` first) with one
stick throttled to --bps bytes/s, and for each size writes that much, left dirty, then
prepares (flush, unmount, hand over) and releases. Prints one line per size.
Run: sudo .venv/bin/python benchmarks/flush_throttled.py [--bps 2097152]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from safeusb.lab import harness  # noqa: E402
from tests.vm import GUEST_DIR  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bps", type=int, default=2 * 1024 * 1024)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    sizes = [2, 4, 8]  # MiB written before each flush (tests/vm/guest/bench-flush.sh)
    boot = harness.Boot(
        name="bench-flush",
        sticks=(harness.Stick("slow", harness.Image.ext4(), write_bps=args.bps),),
        scenarios=(harness.Scenario("bench", "bench-flush.sh",
                                    payloads={"data.bin": max(sizes) * harness.MIB}),),
        memory="3G",
    )
    res = harness.run_boot(boot, GUEST_DIR)
    try:
        if res.error:
            print(f"benchmark: the VM run failed: {res.error}", file=sys.stderr)
            return 1
        sc = res.scenario("bench")
        print(f"write throttling {args.bps / 1048576:.2f} MiB/s")
        print(f"{'MiB':>5} {'dirty MiB':>10} {'expected s':>11} {'flush s':>8} "
              f"{'prepare s':>10} {'off by':>8}  within goal")
        for line in sc.file("rounds").splitlines():
            mib, dirty_kb, rc = line.split()
            doc = json.loads(sc.file(f"prepare-{mib}.json") or "{}")
            if rc != "0" or not doc.get("ok"):
                print(f"{mib:>5} prepare failed: {sc.file(f'prepare-{mib}.err')[-300:]}")
                continue
            flush = sum(s for d, s in zip(doc["done"], doc["seconds"], strict=True)
                        if d.startswith("flush"))
            dirty = int(dirty_kb) * 1024
            expected = dirty / args.bps
            off = flush - expected
            ok = abs(off) <= 0.1 * expected + 0.1
            print(f"{mib:>5} {dirty / 1048576:>10.2f} {expected:>11.2f} {flush:>8.2f} "
                  f"{sum(doc['seconds']):>10.2f} {off:>+8.2f}  {'yes' if ok else 'no'}")
        return 0
    finally:
        if args.keep:
            print(f"kept {res.workdir}")
        else:
            shutil.rmtree(res.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
