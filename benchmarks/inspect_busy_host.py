#!/usr/bin/env python3
"""Benchmark: `safeusb inspect` on a busy host against what an admin runs by hand.

Builds a busy host (processes holding open files, many mount namespaces, one loop-backed
ext4 mounted in some of them), then times, in one run, `safeusb inspect /dev/loopN`
against `lsblk -J` + `findmnt -N PID` for each namespace + `fuser -m`. Prints figures at
several sizes; needs root. Run: sudo .venv/bin/python benchmarks/inspect_busy_host.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAFEUSB = ROOT / ".venv" / "bin" / "safeusb"


def run(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout


class BusyHost:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ns_pids: list[int] = []
        image = work / "stick.img"
        with open(image, "wb") as f:
            f.truncate(64 * 1024 * 1024)
        run("mkfs.ext4", "-q", "-F", str(image))
        self.loop = run("losetup", "--find", "--show", str(image)).strip()
        self.files = []
        for i in range(8):
            p = work / f"f{i}"
            p.write_bytes(b"x")
            self.files.append(p)

    def grow(self, processes: int, namespaces: int, mounted_in: int) -> None:
        """Add processes up to the given count; each holds 4 files open (with stdio)."""
        while len(self.ns_pids) < namespaces:
            i = len(self.ns_pids)
            mnt = self.work / f"ns{i}"
            mnt.mkdir(exist_ok=True)
            script = (f"mount {self.loop} {mnt} && exec sleep 3600" if i < mounted_in
                      else "exec sleep 3600")
            p = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                  script], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL)
            self.procs.append(p)
            self.ns_pids.append(p.pid)
        held = [os.open(f, os.O_RDONLY) for f in self.files[:1]]
        with open(self.files[1], "rb") as stdin:
            while len(self.procs) < processes:
                self.procs.append(subprocess.Popen(
                    ["sleep", "3600"], stdin=stdin, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, pass_fds=held))
        for fd in held:
            os.close(fd)
        time.sleep(1.0)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        subprocess.run(["losetup", "-d", self.loop], check=False)


def timed(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def count_fds() -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                n += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                pass
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,2000,3000", help="process counts")
    ap.add_argument("--namespaces", type=int, default=100)
    ap.add_argument("--mounted-in", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("benchmark: needs root", file=sys.stderr)
        return 2
    missing = [t for t in ("lsblk", "findmnt", "fuser", "losetup", "unshare")
               if shutil.which(t) is None]
    if missing:
        print(f"benchmark: missing {', '.join(missing)} (apt-get install psmisc util-linux)",
              file=sys.stderr)
        return 2
    print(f"{'procs':>6} {'fds':>7} {'mntns':>6} {'inspect ms':>11} {'by hand ms':>11} "
          f"{'ratio':>6}  exit")
    with tempfile.TemporaryDirectory(prefix="safeusb-bench-") as tmp:
        host = BusyHost(Path(tmp))
        try:
            for size in (int(s) for s in args.sizes.split(",")):
                host.grow(size, args.namespaces, args.mounted_in)
                node = host.loop
                rc = subprocess.run([str(SAFEUSB), "inspect", node], capture_output=True,
                                    check=False).returncode

                def inspect(node: str = node) -> None:
                    subprocess.run([str(SAFEUSB), "inspect", node],
                                   stdout=subprocess.DEVNULL, check=False)

                def by_hand(node: str = node) -> None:
                    subprocess.run(["lsblk", "-J"], stdout=subprocess.DEVNULL, check=False)
                    for pid in host.ns_pids:
                        subprocess.run(["findmnt", "-N", str(pid)],
                                       stdout=subprocess.DEVNULL, check=False)
                    subprocess.run(["fuser", "-m", node], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, check=False)

                t_ins = timed(inspect, args.repeat)
                t_hand = timed(by_hand, args.repeat)
                nprocs = sum(1 for p in os.listdir("/proc") if p.isdigit())
                print(f"{nprocs:>6} {count_fds():>7} {len(host.ns_pids):>6} "
                      f"{t_ins * 1000:>11.1f} {t_hand * 1000:>11.1f} {t_ins / t_hand:>6.2f}  {rc}",
                      flush=True)
        finally:
            host.close()
    print("goal: ratio <= 0.5 (aim 0.25); inspect time should grow linearly with processes + fds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
