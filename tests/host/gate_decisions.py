"""Decisions the host tests plug into the gate with --decision MODULE:FUNCTION."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from safeusb.errors import SafeUSBError
from safeusb.gate.qemu_usb_host import UsbHostRequest


def refuse_bus_9(request: UsbHostRequest, cancel: threading.Event) -> None:
    """Allow every device except those on bus 9 (and say which)."""
    if request.hostbus == 9:
        raise SafeUSBError(f"bus 9 device {request.hostaddr} is mounted at /mnt/test")


def crash(request: UsbHostRequest, cancel: threading.Event) -> None:
    raise RuntimeError("decision exploded")


def slow_then_undo(request: UsbHostRequest, cancel: threading.Event) -> None:
    """Change the "host" (a marker file named by SAFEUSB_TEST_MARK), wait to be
    cancelled, then take a second to put it back, and refuse."""
    mark = Path(os.environ["SAFEUSB_TEST_MARK"])
    mark.write_text("changed")
    if not cancel.wait(60):
        raise SafeUSBError("never cancelled")
    time.sleep(1.0)
    mark.unlink()
    raise SafeUSBError("prepare was cancelled; host state: as before")
