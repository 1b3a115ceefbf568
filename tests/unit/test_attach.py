"""attach-device/detach-device: flags as virsh has them, errors through libvirt's test driver."""

from __future__ import annotations

import subprocess
from pathlib import Path

import libvirt
import pytest

from safeusb.attach import Flags


def test_flags_follow_virsh() -> None:
    live, config = libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG
    assert Flags(live=True).libvirt_flags(True) == live
    assert Flags(config=True).libvirt_flags(True) == config
    assert Flags(persistent=True).libvirt_flags(True) == live | config
    assert Flags(persistent=True).libvirt_flags(False) == config
    assert Flags().libvirt_flags(True) == 0
    assert Flags(live=True).affects_live(True) and Flags().affects_live(True)
    assert not Flags(config=True).affects_live(True)
    assert not Flags(live=True).affects_live(False)
    with pytest.raises(Exception, match="--current cannot"):
        Flags(current=True, live=True).libvirt_flags(True)


def _run(safeusb_cmd: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*safeusb_cmd, *args], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_errors_name_the_reason(safeusb_cmd: list[str], tmp_path: Path) -> None:
    hostdev = tmp_path / "h.xml"
    hostdev.write_text("<hostdev mode='subsystem' type='usb'><source><vendor id='0xdead'/>"
                       "<product id='0xbeef'/></source></hostdev>")
    p = _run(safeusb_cmd, "attach-device", "nosuch", str(hostdev), "--live",
             "-c", "test:///default")
    assert p.returncode == 1 and p.stderr.strip() == "safeusb: libvirt: Domain not found"
    p = _run(safeusb_cmd, "attach-device", "test", str(hostdev), "--live",
             "-c", "test:///default")
    assert p.returncode == 2 and ("no such USB device" in p.stderr or "no USB" in p.stderr)
    disk = tmp_path / "disk.xml"
    disk.write_text("<disk type='file' device='disk'><source file='/x.img'/>"
                    "<target dev='vdb'/></disk>")
    p = _run(safeusb_cmd, "attach-device", "test", str(disk), "--config",
             "-c", "test:///default")
    assert p.returncode == 1 and p.stderr.startswith("safeusb: libvirt: ")
    assert _run(safeusb_cmd, "attach-device", "test", str(tmp_path / "missing.xml"),
                "-c", "test:///default").returncode == 2
