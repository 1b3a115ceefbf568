"""`safeusb demo`: the problem and the fix on a real kernel, side by side.

Boots a Debian kernel under QEMU with two emulated USB sticks, libvirtd and a running
guest (the project's real-kernel test harness, tests/vm), and hands each mounted stick,
4 MiB freshly written, to the guest: once with plain `virsh attach-device --live`, once
with `safeusb attach-device` (refused under the built-in policy, then flushed and
unmounted under mount = "unmount"). Then it reads both sticks back from outside.
Installs nothing: says what is missing and how to get it.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def missing_prerequisites() -> list[str]:
    missing = []
    if not (REPO / "tests" / "vm" / "harness.py").exists():
        return [f"the source checkout's tests/vm (not found under {REPO})"]
    if os.geteuid() != 0:
        missing.append("root: run it with sudo")
    if not any(Path(f"/lib/modules/{k.name.removeprefix('vmlinuz-')}/kernel").is_dir()
               for k in Path("/boot").glob("vmlinuz-*")):
        missing.append("a Debian kernel with its modules in /boot and /lib/modules")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64")
    if not (REPO / ".venv" / "bin" / "vng").exists():
        missing.append("virtme-ng (vng) in .venv")
    if shutil.which("virsh") is None or shutil.which("libvirtd", path="/usr/sbin") is None:
        missing.append("libvirt (libvirtd, virsh)")
    return missing


def _progress(stop: threading.Event, start: float) -> None:
    tty = sys.stderr.isatty()
    while not stop.wait(1.0):
        text = (f"booting a Debian kernel under QEMU with two USB sticks, libvirtd and a "
                f"guest... {time.monotonic() - start:.0f} s")
        if tty:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
        elif int(time.monotonic() - start) % 15 == 0:
            print(text, file=sys.stderr)
    if tty:
        sys.stderr.write("\r\033[K")


def _first_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "(no output)"


def demo_boot(harness: Any) -> Any:
    """The demo's boot: two mounted sticks with fresh data, libvirtd and a running guest."""
    return harness.Boot(
        name="demo",
        libvirt=True,
        sticks=(harness.Stick("plain", harness.Image.ext4()),
                harness.Stick("guarded", harness.Image.ext4())),
        scenarios=(
            harness.Scenario("plain", "demo-plain.sh", payloads={"data.bin": 4 * harness.MIB}),
            harness.Scenario("guarded", "demo-guarded.sh",
                             payloads={"data.bin": 4 * harness.MIB}),
        ),
    )


def main(keep: bool = False) -> int:
    missing = missing_prerequisites()
    if missing:
        print("safeusb demo needs:", file=sys.stderr)
        for m in missing:
            print(f"  - {m}", file=sys.stderr)
        print("install them with: sudo scripts/setup-vm-tier (then run the demo again)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from tests.vm import harness  # noqa: PLC0415 (the checkout's real-kernel harness)

    boot = demo_boot(harness)
    stop = threading.Event()
    start = time.monotonic()
    ticker = threading.Thread(target=_progress, args=(stop, start), daemon=True)
    ticker.start()
    try:
        res = harness.run_boot(boot)
    finally:
        stop.set()
        ticker.join()
    try:
        if res.error:
            print(f"safeusb demo: the VM run failed: {res.error}\n{res.console[-3000:]}",
                  file=sys.stderr)
            return 1
        rows = []
        for name, who in (("plain", "plain libvirt"), ("guarded", "safeusb")):
            sc = res.scenario(name)
            n = sc.notes()
            check = res.check_stick(name, {"data.bin": (name, "data.bin")})
            data = "intact" if check.intact else "LOST: " + "; ".join(
                f"{f.path} {f.status}" for f in check.files if f.status != "ok")
            label = who
            if name == "guarded":
                rows.append((f"{who}, built-in policy",
                             f"exit {n.get('refused_rc')}: {_first_line(sc.file('refused.out'))}",
                             "(still mounted on the host)"))
                label = f'{who}, mount = "unmount"'
            rows.append((label, f"exit {n.get('attach_rc')}: "
                                f"{_first_line(sc.file('attach.out'))}", data))
        print(f"Real kernel, libvirt and a running guest; two sticks mounted, each with 4 MiB "
              f"just written ({time.monotonic() - start:.0f} s):\n")
        width = max(len(r[0]) for r in rows)
        for who, attach, data in rows:
            print(f"  {who:<{width}}  attach: {attach}")
            print(f"  {'':<{width}}  data on the stick afterwards: {data}")
        if keep:
            print(f"\nlogs and images kept in {res.workdir}")
        return 0
    finally:
        if not keep:
            shutil.rmtree(res.workdir, ignore_errors=True)
