"""QEMU command lines as libvirt writes them, and usb-host requests."""

from __future__ import annotations

import json
import os

import pytest

from safeusb.errors import SafeUSBError
from safeusb.gate.launcher import parse_gate_argv
from safeusb.gate.qemu_usb_host import RequestError, hmp_device_add, usb_host_request
from safeusb.gate.qemuargs import MonitorArgsError, domain_name, find_monitor, with_monitor_fd
from safeusb.host.usbfs import FdIdentity

LIBVIRT9 = [
    "-name", "guest=g1,debug-threads=on", "-S", "-machine", "pc,usb=off",
    "-chardev", "socket,id=charmonitor,fd=29,server=on,wait=off",
    "-mon", "chardev=charmonitor,id=monitor,mode=control",
    "-device", '{"driver":"qemu-xhci","id":"usb","bus":"pci.0","addr":"0x2"}',
]


def test_libvirt9_monitor_fd_is_found_and_swapped_keeping_the_rest() -> None:
    mon = find_monitor(LIBVIRT9)
    assert mon is not None and (mon.fd, mon.path, mon.chardev_id) == (29, None, "charmonitor")
    out = with_monitor_fd(LIBVIRT9, mon, 7)
    assert out[6] == "socket,id=charmonitor,server=on,wait=off,fd=7"
    assert out[:6] == LIBVIRT9[:6] and out[7:] == LIBVIRT9[7:]
    assert domain_name(LIBVIRT9) == "g1"


def test_path_monitor_becomes_fd() -> None:
    args = ["-chardev", "socket,id=mon,path=/run/a,,b.sock,server=on,wait=off",
            "-mon", "chardev=mon,mode=control"]
    mon = find_monitor(args)
    assert mon is not None and mon.path == "/run/a,b.sock"
    assert with_monitor_fd(args, mon, 5)[1] == "socket,id=mon,server=on,wait=off,fd=5"


def test_json_chardev_monitor() -> None:
    cd = {"id": "charmonitor", "backend": {"type": "socket", "data": {
        "addr": {"type": "fd", "data": {"str": "31"}}, "server": True, "wait": False}}}
    args = ["-chardev", json.dumps(cd), "-mon", "chardev=charmonitor,id=monitor,mode=control"]
    mon = find_monitor(args)
    assert mon is not None and mon.fd == 31
    swapped = json.loads(with_monitor_fd(args, mon, 4)[1])
    assert swapped["backend"]["data"]["addr"] == {"type": "fd", "data": {"str": "4"}}
    assert swapped["backend"]["data"]["wait"] is False


def test_capability_probe_has_no_guarded_monitor() -> None:
    assert find_monitor(["-S", "-qmp", "unix:/x/qmp.monitor,server=on,wait=off",
                         "-daemonize"]) is None


@pytest.mark.parametrize("args", [
    ["-chardev", "pty,id=m", "-mon", "chardev=m,mode=control"],
    ["-chardev", "socket,id=m,path=/x", "-mon", "chardev=m,mode=control"],
    ["-mon", "chardev=m,mode=control"],
    ["-chardev", "socket,id=a,fd=3,server=on", "-mon", "chardev=a,mode=control",
     "-chardev", "socket,id=b,fd=4,server=on", "-mon", "chardev=b,mode=control"],
])
def test_monitors_the_gate_cannot_guard_are_refused(args: list[str]) -> None:
    with pytest.raises(MonitorArgsError):
        find_monitor(args)


def test_gate_argv_forms(tmp_path: object) -> None:
    ga = parse_gate_argv(["/usr/local/lib/safeusb/gate/usr/bin/qemu-system-x86_64", "-S"])
    assert ga.real_emulator == "/usr/bin/qemu-system-x86_64" and ga.qemu_args == ("-S",)
    ga = parse_gate_argv(["gate", "--real-emulator", "/usr/bin/q", "--", "-name", "x"])
    assert ga.real_emulator == "/usr/bin/q" and ga.qemu_args == ("-name", "x")
    assert ga.daemon_socket is None  # safeusbd at its standard place
    ga = parse_gate_argv(["gate", "--real-emulator", "/usr/bin/q", "--daemon-socket",
                          "/tmp/d.sock", "--", "-S"])
    assert ga.daemon_socket == "/tmp/d.sock" and ga.qemu_args == ("-S",)
    for bad in (["gate", "-S"], ["gate", "--real-emulator", "q", "--"],
                ["gate", "--real-emulator", "/usr/bin/q", "--daemon-socket", "d.sock", "--"],
                ["/usr/local/lib/safeusb/gate/usr/local/lib/safeusb/gate/usr/bin/q"]):
        with pytest.raises(SafeUSBError):
            parse_gate_argv(bad)


STICK = FdIdentity("/dev/bus/usb/002/003", (189, 130))
NULL = FdIdentity("/dev/null", (1, 3))


@pytest.mark.parametrize(("args", "busaddr"), [
    ({"hostbus": 2, "hostaddr": 3}, (2, 3)),
    ({"hostbus": "2", "hostaddr": "3"}, (2, 3)),
    ({"hostdevice": "/dev/bus/usb/002/003"}, (2, 3)),
    ({"hostdevice": "/dev/fdset/1"}, (2, 3)),
    ({"hostdevice": "/dev/bus/usb/001/001", "hostbus": 9, "hostaddr": 9}, (1, 1)),
])
def test_requests_name_the_device_qemu_would_open(args: dict, busaddr: tuple) -> None:  # type: ignore[type-arg]
    req = usb_host_request({"driver": "usb-host", **args}, {1: (STICK,)}, "g1")
    assert (req.hostbus, req.hostaddr) == busaddr and req.domain == "g1"


@pytest.mark.parametrize("args", [
    {}, {"hostbus": 0, "hostaddr": 0}, {"hostaddr": 3}, {"vendorid": 0x46F4},
    {"vendorid": 0x46F4, "productid": 1}, {"hostbus": 2, "hostport": "1.4"},
    {"hostbus": True, "hostaddr": 1}, {"hostbus": 1.5, "hostaddr": 1},
    {"hostdevice": "/dev/fdset/2"}, {"hostdevice": "/dev/fdset/3"},
    {"hostdevice": "/dev/fdset/4"}, {"hostdevice": 5}, {"hostbus": 2, "hostport": "a"},
])
def test_requests_that_name_no_single_device_are_refused(args: dict) -> None:  # type: ignore[type-arg]
    fdsets = {3: (NULL,), 4: (STICK, FdIdentity("/dev/bus/usb/001/002", (189, 1)))}
    with pytest.raises(RequestError):
        usb_host_request(args, fdsets)


def test_hostdevice_other_path_is_resolved_by_stat() -> None:
    with pytest.raises(RequestError):
        usb_host_request({"hostdevice": "/nonexistent/usb"}, {})
    req = usb_host_request({"hostdevice": "/dev/usbstick"}, {},
                           stat_path=lambda _p: _chr(189, 130))
    assert (req.hostbus, req.hostaddr) == (2, 3)
    with pytest.raises(RequestError, match="not a USB device node"):
        usb_host_request({"hostdevice": "/dev/sda"}, {}, stat_path=lambda _p: _chr(8, 0))


def _chr(major: int, minor: int) -> os.stat_result:
    rdev = os.makedev(major, minor)
    return os.stat_result((0o20600, 0, 0, 1, 0, 0, 0, 0, 0, 0), {"st_rdev": rdev})


def test_hmp_device_add_parsing() -> None:
    assert hmp_device_add("device_add usb-host,hostbus=1,hostaddr=2,id=a,,b") == {
        "driver": "usb-host", "hostbus": "1", "hostaddr": "2", "id": "a,b"}
    assert hmp_device_add("info status") is None
    with pytest.raises(RequestError):
        hmp_device_add("device_add usb-host,hostbus=1,hostbus=2")
