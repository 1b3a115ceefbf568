"""Record a QMP conversation with a real QEMU, as libvirt 9 holds it, into JSON lines.

    python tools/record_qmp.py OUT.jsonl [refuse]

Each line: {"from": "libvirt"|"qemu", "raw": "<exact text>", "fds": [...]} in the order
seen. An fd libvirt passes is described by what it would point at on a host with USB
("path", "rdev"); the recording itself passes /dev/null, so QEMU's replies to the
commands using it are QEMU's real replies for an fd it cannot use as a USB device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

QEMU = "/usr/bin/qemu-system-x86_64"
STICK = {"path": "/dev/bus/usb/002/003", "rdev": [189, 130]}


def main() -> None:
    out_path = sys.argv[1]
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "monitor.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    qemu = subprocess.Popen(
        [QEMU, "-name", "guest=rec,debug-threads=on", "-machine", "pc,accel=tcg",
         "-nodefaults", "-display", "none", "-S",
         "-chardev", f"socket,id=charmonitor,fd={fd},server=on,wait=off",
         "-mon", "chardev=charmonitor,id=monitor,mode=control",
         "-device", '{"driver":"qemu-xhci","id":"usb","bus":"pci.0","addr":"0x2"}'],
        pass_fds=[fd],
    )
    conv: list[dict[str, object]] = []
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    f = c.makefile("rb")

    def read_until_response() -> None:
        while True:
            line = f.readline()
            conv.append({"from": "qemu", "raw": line.decode()})
            msg = json.loads(line)
            if "return" in msg or "error" in msg:
                return

    def cmd(obj: dict[str, object], fds: list[dict[str, object]] | None = None) -> None:
        raw = json.dumps(obj, separators=(",", ":")) + "\r\n"
        conv.append({"from": "libvirt", "raw": raw, "fds": fds or []})
        if fds:
            null = os.open("/dev/null", os.O_RDWR)
            c.sendmsg([raw.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         null.to_bytes(4, sys.byteorder))])
            os.close(null)
        else:
            c.sendall(raw.encode())
        read_until_response()

    line = f.readline()
    conv.append({"from": "qemu", "raw": line.decode()})
    n = iter(range(1, 1000))
    cmd({"execute": "qmp_capabilities", "id": f"libvirt-{next(n)}"})
    cmd({"execute": "query-status", "id": f"libvirt-{next(n)}"})
    cmd({"execute": "cont", "id": f"libvirt-{next(n)}"})
    time.sleep(0.2)
    cmd({"execute": "stop", "id": f"libvirt-{next(n)}"})
    cmd({"execute": "getfd", "arguments": {"fdname": "fdset-probe"},
         "id": f"libvirt-{next(n)}"}, [{"path": "/dev/null", "rdev": [1, 3]}])
    cmd({"execute": "closefd", "arguments": {"fdname": "fdset-probe"},
         "id": f"libvirt-{next(n)}"})
    cmd({"execute": "add-fd", "arguments": {"fdset-id": 0, "opaque": "hostdev0"},
         "id": f"libvirt-{next(n)}"}, [STICK])
    cmd({"execute": "device_add", "arguments": {
        "driver": "usb-host", "hostdevice": "/dev/fdset/0", "id": "hostdev0",
        "bus": "usb.0", "port": "1"}, "id": f"libvirt-{next(n)}"})
    cmd({"execute": "remove-fd", "arguments": {"fdset-id": 0}, "id": f"libvirt-{next(n)}"})
    cmd({"execute": "device_add", "arguments": {
        "driver": "usb-host", "hostdevice": "/dev/bus/usb/002/003", "id": "hostdev1",
        "bus": "usb.0", "port": "2"}, "id": f"libvirt-{next(n)}"})
    cmd({"execute": "device_add", "arguments": {
        "driver": "usb-host", "hostbus": 2, "hostaddr": 3, "id": "hostdev2",
        "bus": "usb.0", "port": "3"}, "id": f"libvirt-{next(n)}"})
    cmd({"execute": "qom-list", "arguments": {"path": "/machine/peripheral"},
         "id": f"libvirt-{next(n)}"})
    cmd({"execute": "quit", "id": f"libvirt-{next(n)}"})
    try:
        rest = f.read()
    except ConnectionResetError:
        rest = b""
    for line in rest.splitlines(keepends=True):
        conv.append({"from": "qemu", "raw": line.decode()})
    qemu.wait()
    with open(out_path, "w") as out:
        for item in conv:
            out.write(json.dumps(item) + "\n")


if __name__ == "__main__":
    main()
