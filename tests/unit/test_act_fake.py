"""prepare's judgement of a device that left the host, and of the process the kernel guard
refused, on built sysfs trees."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from safeusb.handover.transaction import _left_the_host, without_request
from safeusb.host import sysfs
from safeusb.host.model import ProcessUse
from safeusb.host.parsers import parse_devnum
from safeusb.host.selector import Selector, resolve
from safeusb.host.snapshot import read_snapshot
from safeusb.inspect.decide import inspect
from tests.unit.fakesys import LINUX_NS, ROOT_MOUNT, FakeSystem


def _stick(tmp_path: Path) -> tuple[FakeSystem, Path]:
    fs = FakeSystem(tmp_path)
    return fs, fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)


def test_device_still_at_its_port_has_not_left(tmp_path: Path) -> None:
    fs, path = _stick(tmp_path)
    assert not _left_the_host(fs.roots, sysfs.read_usb_device(str(path)))


def test_device_gone_from_its_port_has_left(tmp_path: Path) -> None:
    fs, path = _stick(tmp_path)
    usb = sysfs.read_usb_device(str(path))
    shutil.rmtree(path)
    assert _left_the_host(fs.roots, usb)


def test_another_device_at_the_same_port_means_it_left(tmp_path: Path) -> None:
    """Pulled and plugged back (or another stick): the kernel gives it a new address."""
    fs, path = _stick(tmp_path)
    usb = sysfs.read_usb_device(str(path))
    (path / "devnum").write_text("4\n")
    assert _left_the_host(fs.roots, usb)


def test_the_refused_process_holding_the_usbfs_node_is_its_request(tmp_path: Path) -> None:
    """The process the kernel guard refused (QEMU's usb-host goes on with a dead device)
    keeps the device's usbfs node open: that is no use of the device; what it holds
    besides (a disk of the device), and every other process, still count."""
    fs, path = _stick(tmp_path)
    fs.disk(path, "sda", 8, 0)
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    target = resolve(Selector.from_string("2-1"), fs.roots)
    usbfs = ("char", parse_devnum("189:130"))
    sda = ("block", parse_devnum("8:0"))
    snap = replace(read_snapshot(fs.roots, target), uses=(
        ProcessUse(900, "qemu-system-x86", "fd", "/dev/bus/usb/002/003", node=usbfs),
        ProcessUse(901, "lsusb", "fd", "/dev/bus/usb/002/003", node=usbfs),
        ProcessUse(902, "qemu-system-x86", "fd", "/dev/sda", node=sda)))
    assert {(u.pid, u.path) for u in snap.uses} >= {(900, "/dev/bus/usb/002/003")}
    assert [(u.pid, u.path) for u in without_request(snap, 900).uses] == [
        (901, "/dev/bus/usb/002/003"), (902, "/dev/sda")]
    assert [(u.pid, u.path) for u in without_request(snap, 902).uses] == [
        (900, "/dev/bus/usb/002/003"), (901, "/dev/bus/usb/002/003"), (902, "/dev/sda")]
    texts = [r.text for r in inspect(without_request(snap, 900)).reasons]
    assert not any("pid 900" in t for t in texts) and any("pid 901" in t for t in texts)
