"""`safeusb demo`: the problem and the fix on a real kernel, side by side.

Boots a Debian kernel under QEMU with two emulated USB sticks, libvirtd and a running
guest (safeusb.lab, the harness the real-kernel tests use too; the guest runs this
installation's safeusb), and hands each mounted stick, 4 MiB freshly written, to the
guest: once with plain `virsh attach-device --live`, once with `safeusb attach-device`
(refused under the built-in policy, then flushed and unmounted under mount = "unmount").
Then it reads both sticks back from outside. Installs nothing: says what is missing and
how to get it.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time

from safeusb.lab import harness
from safeusb.lab.harness import (
    LAB_GUEST,
    MIB,
    SAFEUSB,
    Boot,
    BootResult,
    Image,
    LabFailure,
    Scenario,
    Stick,
)


def missing_prerequisites() -> list[str]:
    """Everything the demo lacks on this machine, each with where to get it."""
    missing = harness.missing_prerequisites()
    path = harness.tool_path()
    for tool, source in (("virsh", "Debian package libvirt-clients"),
                         ("libvirtd", "Debian package libvirt-daemon-system")):
        if shutil.which(tool, path=path) is None:
            missing.append(f"{tool} not found in {', '.join(harness.tool_dirs())} or PATH "
                           f"({source})")
    if not SAFEUSB.exists():
        missing.append(f"the safeusb command the guest runs, {SAFEUSB} (install safeusb "
                       "with its scripts)")
    for script in ("driver.sh", "lib.sh", "libvirt-up.sh", "stock-up.sh", "g1.xml",
                   "demo-plain.sh", "demo-guarded.sh"):
        if not (LAB_GUEST / script).is_file():
            missing.append(f"{LAB_GUEST / script} (a file of the safeusb package)")
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


def demo_boot() -> Boot:
    """The demo's boot: two mounted sticks with fresh data, libvirtd and a running guest.
    Its scripts are the package's (absolute paths: the VM tier runs this boot too)."""
    return Boot(
        name="demo",
        libvirt=True,
        sticks=(Stick("plain", Image.ext4()), Stick("guarded", Image.ext4())),
        scenarios=(
            Scenario("plain", str(LAB_GUEST / "demo-plain.sh"),
                     payloads={"data.bin": 4 * MIB}),
            Scenario("guarded", str(LAB_GUEST / "demo-guarded.sh"),
                     payloads={"data.bin": 4 * MIB}),
        ),
    )


def main(keep: bool = False) -> int:
    missing = missing_prerequisites()
    if missing:
        print("safeusb demo needs:", file=sys.stderr)
        for m in missing:
            print(f"  - {m}", file=sys.stderr)
        if harness.REPO is not None:
            print("install them with: sudo scripts/setup-vm-tier (then run the demo again)",
                  file=sys.stderr)
        return 2
    boot = demo_boot()
    stop = threading.Event()
    start = time.monotonic()
    ticker = threading.Thread(target=_progress, args=(stop, start), daemon=True)
    ticker.start()
    try:
        res = harness.run_boot(boot, LAB_GUEST)
    finally:
        stop.set()
        ticker.join()
    try:
        if res.error:
            print(f"safeusb demo: the VM run failed: {res.error}\n{res.console[-3000:]}",
                  file=sys.stderr)
            return 1
        return _report(res, start, keep)
    except LabFailure as exc:
        print(f"safeusb demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            shutil.rmtree(res.workdir, ignore_errors=True)


def _report(res: BootResult, start: float, keep: bool) -> int:
    """Both handovers side by side, and what reached each stick."""
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
