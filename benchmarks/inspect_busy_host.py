#!/usr/bin/env python3
"""Benchmark: `safeusb inspect` on a busy host against what an admin runs by hand.

Builds a busy host (processes holding open files, many mount namespaces, one loop-backed
ext4 mounted in some of them), then times, in one run, against `lsblk -J` + `findmnt -N
PID` for each namespace + `fuser -m`:
- the /proc path: `SAFEUSB_SCAN=proc safeusb inspect --local /dev/loopN` (the command
  reads /proc itself);
- the in-kernel path: `SAFEUSB_SCAN=kernel safeusb inspect --local /dev/loopN` (open files,
  cwd/root and mappings found by BPF iterators; the rest as on the /proc path), or why it
  cannot run here;
- through the service: `safeusb inspect /dev/loopN` answered by a safeusbd started from
  this checkout on a socket of its own (the scan runs in the daemon, already started);
- safeusbd asked by a running process (this one, over the same socket), as the hook and
  the gate ask it: the daemon's decision with no interpreter start-up on either side.
Prints figures at several sizes, each path's cost per 1,000 processes (a least-squares
slope over the sizes) and the load. After the host grows it waits until it has settled
(settle()); the paths then take turns within each repeat, so that what noise is left
weighs on all of them. The package is compiled first, as an installed one is. Needs
root.
Run: sudo .venv/bin/python benchmarks/inspect_busy_host.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAFEUSB = ROOT / ".venv" / "bin" / "safeusb"
SAFEUSBD = ROOT / ".venv" / "bin" / "safeusbd"
PYTHON = ROOT / ".venv" / "bin" / "python"


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
        settle()

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        subprocess.run(["losetup", "-d", self.loop], check=False)


def settle(timeout: float = 120.0) -> None:
    """Wait until the processes just started have settled: a `sleep` whose exec returned
    still loads its libraries, and thousands of them keep both CPUs busy for seconds. Done
    when, ten samples in a row, at most two tasks are runnable (this one among them)."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 10 and time.monotonic() < deadline:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        quiet = quiet + 1 if running <= 2 else 0
        time.sleep(0.1)


def timed(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    return take_turns({"x": (fn, None, False)}, repeat)["x"][0]


def _ticks(pid: int) -> float:
    """CPU seconds (user + system) a running process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def take_turns(paths, repeat: int) -> dict[str, tuple[float, float]]:  # type: ignore[no-untyped-def]
    """Median wall seconds and median CPU seconds of each path (name -> (fn, also, own)),
    the paths run in turn within each of ``repeat`` rounds. CPU time is that of the
    commands run, of the running process ``also`` (safeusbd) unless None, and of this
    process when ``own``; it is less at the mercy of other load than wall time."""
    walls: dict[str, list[float]] = {name: [] for name in paths}
    cpus: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeat):
        for name, (fn, also, own) in paths.items():
            before = os.times()
            extra = _ticks(also) if also else 0.0
            t = time.perf_counter()
            fn()
            walls[name].append(time.perf_counter() - t)
            after = os.times()
            cpu = (after.children_user - before.children_user
                   + after.children_system - before.children_system)
            if own:
                cpu += after.user - before.user + after.system - before.system
            if also:
                cpu += _ticks(also) - extra
            cpus[name].append(cpu)
    return {name: (statistics.median(walls[name]), statistics.median(cpus[name]))
            for name in paths}


@contextlib.contextmanager
def daemon(work: Path) -> Iterator[tuple[str, int]]:
    """safeusbd from this checkout on a socket of its own; its socket path and pid."""
    sock = work / "safeusbd.sock"
    policy = work / "policy.toml"
    policy.write_text("[defaults]\n")
    with open(work / "safeusbd.log", "wb") as log:
        proc = subprocess.Popen([str(SAFEUSBD), "--socket", str(sock), "--policy", str(policy),
                                 "--state-dir", str(work / "state")], stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"safeusbd did not start: {(work / 'safeusbd.log').read_text()}")
            time.sleep(0.05)
        yield str(sock), proc.pid
    finally:
        proc.terminate()
        proc.wait(60)


def slope(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares line through the points: (per 1,000 processes, at zero)."""
    if len(xs) < 2:
        return float("nan"), float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / \
        sum((x - mx) ** 2 for x in xs)
    return k * 1000, my - k * mx


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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
    ap.add_argument("--sizes", default="1000,3000,10000", help="process counts")
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
    print(f"load average at start: {load()} ({os.cpu_count()} CPUs)")
    # An installed package is compiled (pip and the distribution packages do it at
    # install); a checkout run with PYTHONDONTWRITEBYTECODE would compile at every start.
    subprocess.run([str(PYTHON), "-m", "compileall", "-q", str(ROOT / "safeusb")],
                   stdout=subprocess.DEVNULL, check=True)
    for name, argv in (("python -c pass", [str(PYTHON), "-c", "pass"]),
                       ("python -S -c pass", [str(PYTHON), "-S", "-c", "pass"])):
        t = timed(lambda argv=argv: subprocess.run(argv, check=False), args.repeat)
        print(f"interpreter start-up, {name}: {t * 1000:.1f} ms")
    print("wall ms (CPU ms: the commands' own, safeusbd's included), medians; x: against by "
          "hand")
    sys.path.insert(0, str(ROOT))
    from safeusb.host import bpfscan  # noqa: PLC0415
    from safeusb.host.roots import Roots  # noqa: PLC0415
    from safeusb.safeusbd.client import ask  # noqa: PLC0415

    why = bpfscan.unavailable(Roots.host())
    if why is None:
        try:
            bpfscan.read_records({})
        except bpfscan.Unavailable as exc:
            why = str(exc)
    names = ("/proc", "in-kernel", "safeusbd", "asked", "by hand")
    print(f"{'procs':>6} {'fds':>7} {'mntns':>6} "
          + " ".join(f"{n:>12}" for n in names) + " "
          + " ".join(f"{n + ' x':>12}" for n in names[:-1]) + "  exit  same")
    rows: list[tuple[int, dict[str, tuple[float, float]]]] = []
    with tempfile.TemporaryDirectory(prefix="safeusb-bench-") as tmp:
        host = BusyHost(Path(tmp))
        try:
            with daemon(Path(tmp)) as (sock, dpid):
                for size in (int(s) for s in args.sizes.split(",")):
                    host.grow(size, args.namespaces, args.mounted_in)
                    node = host.loop
                    local_argv = ["env", "SAFEUSB_SCAN=proc", str(SAFEUSB), "inspect",
                                  "--local", node]
                    kernel_argv = ["env", "SAFEUSB_SCAN=kernel", str(SAFEUSB), "inspect",
                                   "--local", node]
                    daemon_argv = [str(SAFEUSB), "inspect", "--daemon-socket", sock, node]
                    local = subprocess.run(local_argv, capture_output=True, check=False)
                    served = subprocess.run(daemon_argv, capture_output=True, check=False)
                    outs = [(local.returncode, local.stdout), (served.returncode, served.stdout)]
                    if why is None:
                        kern = subprocess.run(kernel_argv, capture_output=True, check=False)
                        outs.append((kern.returncode, kern.stdout))
                    as_json = subprocess.run([*local_argv, "--json"], capture_output=True,
                                             check=False)
                    answer = ask("inspect", {"selector": node}, sock)
                    same = all(o == outs[0] for o in outs) and \
                        json.loads(as_json.stdout) == answer

                    def by_hand(node: str = node) -> None:
                        subprocess.run(["lsblk", "-J"], stdout=subprocess.DEVNULL, check=False)
                        for pid in host.ns_pids:
                            subprocess.run(["findmnt", "-N", str(pid)],
                                           stdout=subprocess.DEVNULL, check=False)
                        subprocess.run(["fuser", "-m", node], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, check=False)

                    def quiet(argv: list[str]) -> None:
                        subprocess.run(argv, stdout=subprocess.DEVNULL, check=False)

                    paths = {
                        "/proc": (lambda a=local_argv: quiet(a), None, False),
                        "safeusbd": (lambda a=daemon_argv: quiet(a), dpid, False),
                        "asked": (lambda n=node: ask("inspect", {"selector": n}, sock),
                                  dpid, True),
                        "by hand": (by_hand, None, False),
                    }
                    if why is None:
                        paths["in-kernel"] = (lambda a=kernel_argv: quiet(a), None, False)
                    got = take_turns(paths, args.repeat)
                    nan = (float("nan"), float("nan"))
                    nprocs = sum(1 for p in os.listdir("/proc") if p.isdigit())
                    rows.append((nprocs, {n: got.get(n, nan) for n in names}))
                    hand = got["by hand"]

                    def ms(wall: float, cpu: float) -> str:
                        if wall != wall:  # nan: not run
                            return "-"
                        return f"{wall * 1000:.0f} ({cpu * 1000:.0f})"

                    def x(a: float, ca: float, hand: tuple[float, float] = hand) -> str:
                        if a != a:
                            return "-"
                        return f"{a / hand[0]:.2f} ({ca / hand[1]:.2f})"

                    print(f"{nprocs:>6} {count_fds():>7} {len(host.ns_pids):>6} "
                          + " ".join(f"{ms(*got.get(n, nan)):>12}" for n in names) + " "
                          + " ".join(f"{x(*got.get(n, nan)):>12}" for n in names[:-1])
                          + f"  {local.returncode:>4}  {'yes' if same else 'NO'}",
                          flush=True)
        finally:
            host.close()
    xs = [r[0] for r in rows]
    labels = {"/proc": "/proc path", "in-kernel": "in-kernel", "safeusbd": "through safeusbd",
              "asked": "safeusbd, asked", "by hand": "by hand"}
    for name in names:
        if name == "in-kernel" and why is not None:
            print(f"{labels[name]:>17}: not run: {why}")
            continue
        k, c = slope(xs, [r[1][name][0] * 1000 for r in rows])
        kc, cc = slope(xs, [r[1][name][1] * 1000 for r in rows])
        print(f"{labels[name]:>17}: {k:6.1f} ms per 1,000 processes, {c:6.1f} ms at none "
              f"(CPU: {kc:5.1f} ms per 1,000, {cc:5.1f} ms at none)")
    print(f"load average at end: {load()}")
    print("goal: /proc path <= 0.5 x by hand at every size; in-kernel <= 0.1 x at 3,000 and "
          "10,000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
