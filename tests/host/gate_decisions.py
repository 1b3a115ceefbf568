"""Decisions the host tests plug into the gate with --decision MODULE:FUNCTION."""

from __future__ import annotations

from safeusb.errors import SafeUSBError
from safeusb.usbhost import UsbHostRequest


def refuse_bus_9(request: UsbHostRequest) -> None:
    """Allow every device except those on bus 9 (and say which)."""
    if request.hostbus == 9:
        raise SafeUSBError(f"bus 9 device {request.hostaddr} is mounted at /mnt/test")


def crash(request: UsbHostRequest) -> None:
    raise RuntimeError("decision exploded")
