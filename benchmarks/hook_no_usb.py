#!/usr/bin/env python3
"""Benchmark: the libvirt hook's cost for a domain without USB host devices.

Runs the installed-form drop-in (rendered with this interpreter) against a plain domain
XML, side by side with a hook that is /bin/true and a /bin/sh hook that exits 0, the way
libvirt calls them (argument list, XML on stdin). Prints medians and the ratio.
Run: .venv/bin/python benchmarks/hook_no_usb.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from safeusb.install import render  # noqa: E402

XML = (ROOT / "tests/unit/data/domains/pci.xml").read_bytes()
PLAIN = (ROOT / "tests/unit/data/domains/none.xml").read_bytes()


def median_ms(argv: list[str], xml: bytes, n: int = 200) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, input=xml, stdout=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        hook = Path(tmp) / "safeusb"
        hook.write_text(render(sys.executable))
        hook.chmod(0o755)
        sh = Path(tmp) / "sh-hook"
        sh.write_text("#!/bin/sh\nexit 0\n")
        sh.chmod(0o755)
        args = ["g", "prepare", "begin", "-"]
        true_ms = median_ms(["/bin/true", *args], PLAIN)
        sh_ms = median_ms([str(sh), *args], PLAIN)
        print(f"{'hook':<38} {'median ms':>9} {'x /bin/true':>11}")
        print(f"{'/bin/true':<38} {true_ms:>9.2f} {1.0:>11.2f}")
        print(f"{'/bin/sh exit 0':<38} {sh_ms:>9.2f} {sh_ms / true_ms:>11.2f}")
        for label, xml in (("safeusb, domain without hostdev", PLAIN),
                           ("safeusb, domain with a PCI hostdev", XML)):
            ms = median_ms([str(hook), *args], xml, 50 if b"<hostdev" in xml else 200)
            print(f"{label:<38} {ms:>9.2f} {ms / true_ms:>11.2f}")
    print("goal: no-USB path <= 3x /bin/true and <= 40 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
