"""One walk of a device's sysfs directory: its nodes and its "net" directories, never
below the block layer's own directories of a disk, and everything below anything else;
the USB device list narrowed before it is read; class links followed with one readlink."""

from __future__ import annotations

import os
from pathlib import Path

from safeusb.host import inputdev, sysfs
from tests.unit.fakesys import FakeSystem, _write


def _system(tmp_path: Path) -> tuple[FakeSystem, Path, Path]:
    fs = FakeSystem(tmp_path)
    usb = fs.usb_device("2-1", 0x46F4, 0x0001, 2, 2)
    disk = fs.disk(usb, "sda", 8, 0)
    fs.partition(disk, "sda1", 8, 1)
    return fs, usb, disk


def test_the_walk_finds_every_node_and_net_directory(tmp_path: Path) -> None:
    fs, usb, _disk = _system(tmp_path)
    tty = usb / "2-1:1.0" / "ttyUSB0" / "tty" / "ttyUSB0"
    fs._node(tty, "tty", "ttyUSB0", 188, 0, "char", "")
    (usb / "2-1:1.0" / "net" / "usb0").mkdir(parents=True)
    walked = sysfs.walk_device(str(usb))
    assert {n.devname for n in walked.nodes} == {"bus/usb/002/002", "sda", "sda1", "ttyUSB0"}
    assert walked.net == (str(usb / "2-1:1.0" / "net"),)
    assert walked.nodes == sysfs.nodes_under(str(usb))


def test_below_a_disk_the_block_layers_own_directories_are_not_walked(tmp_path: Path) -> None:
    fs, usb, disk = _system(tmp_path)
    # a node-like directory inside a disk's queue/ (which the kernel never has) is not
    # looked for; the same name below a device of another subsystem is
    fs._node(disk / "queue" / "odd", "misc", "odd", 10, 200, "char", "")
    iface = usb / "2-1:1.0"
    fs._node(iface / "queue" / "odd2", "misc", "odd2", 10, 201, "char", "")
    names = {n.devname for n in sysfs.walk_device(str(usb)).nodes}
    assert "odd" not in names
    assert {"odd2", "sda1"} <= names


def test_the_usb_list_narrowed_by_bus_and_device(tmp_path: Path) -> None:
    fs, _usb, _disk = _system(tmp_path)
    fs.usb_device("2-2", 0x1234, 0x5678, 2, 3)
    roots = fs.roots
    every = sysfs.list_usb_devices(roots)
    assert sysfs.list_usb_devices(roots, bus=2, device=3) == \
        tuple(d for d in every if (d.busnum, d.devnum) == (2, 3))
    assert sysfs.list_usb_devices(roots, sysname="2-1") == \
        tuple(d for d in every if d.sysname == "2-1")
    assert sysfs.list_usb_devices(roots, bus=2, device=9) == ()
    assert len(every) == 3  # the root hub too


def test_a_class_link_leads_where_realpath_does(tmp_path: Path) -> None:
    fs, usb, _disk = _system(tmp_path)
    event = usb / "2-1:1.0" / "input" / "input7"
    _write(event / "name", "kbd\n")
    base = fs.sys / "class" / "input"
    base.mkdir(parents=True)
    (base / "input7").symlink_to(os.path.relpath(event, base))
    (base / "input8").mkdir()  # not a link: realpath's answer
    real_base = os.path.realpath(base)
    for name in ("input7", "input8"):
        assert inputdev._class_link(real_base, name) == os.path.realpath(base / name)
