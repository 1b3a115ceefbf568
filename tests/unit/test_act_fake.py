"""prepare's judgement of a device that left the host, on built sysfs trees."""

from __future__ import annotations

import shutil
from pathlib import Path

from safeusb import sysfs
from safeusb.handover import _left_the_host
from tests.unit.fakesys import FakeSystem


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
