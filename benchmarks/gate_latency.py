"""QMP round trips to a real QEMU, directly and through the gate, side by side.

    .venv/bin/python benchmarks/gate_latency.py [ROUNDS]

Prints per-command latency (mean, median, 99th percentile) for a small command
(query-status), a large reply (query-qmp-schema, ~150 KiB), and a usb-host device_add
(held for the default decision, which runs `safeusb inspect`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"


def start(gated: bool, tmp: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    path = os.path.join(tmp, f"mon-{gated}.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    qemu_args = ["-name", "guest=bench", "-machine", "pc,accel=tcg", "-nodefaults",
                 "-display", "none", "-S", "-m", "32",
                 "-chardev", f"socket,id=charmonitor,fd={fd},server=on,wait=off",
                 "-mon", "chardev=charmonitor,id=monitor,mode=control",
                 "-device", "qemu-xhci,id=usb"]
    argv = ([sys.executable, "-m", "safeusb.gate.launcher", "--real-emulator", QEMU, "--",
             *qemu_args] if gated else [QEMU, *qemu_args])
    proc = subprocess.Popen(argv, pass_fds=[fd], stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    listener.close()
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    return proc, c


def rounds(c: socket.socket, f, cmd: dict[str, object], n: int) -> list[float]:  # type: ignore[no-untyped-def]
    raw = json.dumps(cmd).encode() + b"\r\n"
    out = []
    for _ in range(n):
        t = time.perf_counter()
        c.sendall(raw)
        while True:
            msg = json.loads(f.readline())
            if "event" not in msg:
                break
        out.append(time.perf_counter() - t)
    return out


def fmt(xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return (f"mean {statistics.mean(xs) * 1e3:7.3f} ms  median {statistics.median(xs) * 1e3:7.3f}"
            f" ms  p99 {p99 * 1e3:7.3f} ms")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    tmp = tempfile.mkdtemp()
    results: dict[str, dict[str, list[float]]] = {}
    for gated in (False, True):
        t0 = time.perf_counter()
        proc, c = start(gated, tmp)
        f = c.makefile("rb")
        f.readline()
        rounds(c, f, {"execute": "qmp_capabilities"}, 1)
        startup = time.perf_counter() - t0
        name = "through the gate" if gated else "direct"
        results[name] = {
            "query-status": rounds(c, f, {"execute": "query-status", "id": 1}, n),
            "query-qmp-schema": rounds(c, f, {"execute": "query-qmp-schema", "id": 2}, n // 20),
            "device_add usb-host": rounds(c, f, {"execute": "device_add", "arguments": {
                "driver": "usb-host", "hostbus": 1, "hostaddr": 2}, "id": 3}, 20),
        }
        results[name]["monitor ready after start"] = [startup]
        c.close()
        proc.kill()
        proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)
    for what in results["direct"]:
        print(what)
        for name, by in results.items():
            print(f"  {name:17s} {fmt(by[what])}  (n={len(by[what])})")


if __name__ == "__main__":
    main()
