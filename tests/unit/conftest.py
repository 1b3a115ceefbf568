"""Fixtures shared by the unit tests: built sysfs/procfs trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.fakesys import LINUX_NS, ROOT_MOUNT, FakeSystem, mount_line


@pytest.fixture
def busy(tmp_path: Path) -> FakeSystem:
    """A stick mounted with dirty data, as a built tree."""
    fs = FakeSystem(tmp_path / "root")
    usb = fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    fs.disk(usb, "sda", 8, 0)
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT + mount_line(300, "8:0", "/srv/photos",
                                                            "/dev/sda"))
    fs.bdi(8, 0, 4096, 0)
    return fs
