"""One selector parser, used by every command: which device is meant."""

from __future__ import annotations

import os
import re
import stat
from typing import TYPE_CHECKING

from safeusb.errors import AmbiguousSelector, NoSuchDevice, SelectorError
from safeusb.host import recording, sysfs
from safeusb.host.model import Target, UsbDevice
from safeusb.host.roots import Roots
from safeusb.values import frozen

if TYPE_CHECKING:
    from safeusb.hostdev import UsbHostdev

_SYSNAME = re.compile(r"^\d+-\d+(\.\d+)*$")
_BUSDEV = re.compile(r"^(\d{1,3}):(\d{1,3})$")
_VIDPID = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{4})$")


@frozen
class Selector:
    text: str
    sysname: str | None = None
    bus: int | None = None
    device: int | None = None
    vendor_id: int | None = None
    product_id: int | None = None
    path: str | None = None

    @classmethod
    def from_string(cls, text: str) -> Selector:
        t = text.strip()
        if _SYSNAME.match(t):
            return cls(text, sysname=t)
        m = _BUSDEV.match(t)
        if m:
            return cls(text, bus=int(m.group(1)), device=int(m.group(2)))
        m = _VIDPID.match(t)
        if m:
            return cls(text, vendor_id=int(m.group(1), 16), product_id=int(m.group(2), 16))
        if t.startswith("/dev/") and "\0" not in t:
            return cls(text, path=os.path.normpath(t))
        raise SelectorError(
            text,
            "not a selector: use a sysfs name (2-1), BUS:DEV (002:003), "
            "VENDOR:PRODUCT (46f4:0001), a device node (/dev/sda) or --xml FILE",
        )

    @classmethod
    def from_hostdev(cls, hostdev: UsbHostdev, source: str) -> Selector:
        return cls(
            source,
            bus=hostdev.bus,
            device=hostdev.device,
            vendor_id=hostdev.vendor_id,
            product_id=hostdev.product_id,
        )


def _usb_target(dev: UsbDevice) -> Target:
    return Target(syspath=dev.syspath, usb=dev)


def resolve(selector: Selector, roots: Roots) -> Target:
    """The device a selector names, or a precise SelectorError."""
    if selector.path is not None:
        return _resolve_node(selector, roots)
    devices = sysfs.list_usb_devices(roots, selector.sysname, selector.bus, selector.device)
    if not devices and not os.path.isdir(roots.sys_path("bus", "usb")):
        raise NoSuchDevice(selector.text, "this host has no USB subsystem (/sys/bus/usb)")
    matches = [
        d
        for d in devices
        if (selector.sysname is None or d.sysname == selector.sysname)
        and (selector.bus is None or d.busnum == selector.bus)
        and (selector.device is None or d.devnum == selector.device)
        and (selector.vendor_id is None or d.vendor_id == selector.vendor_id)
        and (selector.product_id is None or d.product_id == selector.product_id)
    ]
    if not matches:
        raise NoSuchDevice(selector.text, "no such USB device")
    if len(matches) > 1:
        raise AmbiguousSelector(selector.text, tuple(d.describe() for d in matches))
    return _usb_target(matches[0])


def _resolve_node(selector: Selector, roots: Roots) -> Target:
    assert selector.path is not None
    path = selector.path
    if not roots.live:
        found = recording.node(roots, path)
        if found is None:
            raise NoSuchDevice(selector.text, "no such device node")
        kind, (major, minor) = found
    else:
        try:
            st = os.stat(roots.dev_path(path))
        except FileNotFoundError:
            raise NoSuchDevice(selector.text, "no such device node") from None
        except OSError as exc:
            raise SelectorError(selector.text, exc.strerror or str(exc)) from None
        if stat.S_ISBLK(st.st_mode):
            kind = "block"
        elif stat.S_ISCHR(st.st_mode):
            kind = "char"
        else:
            raise SelectorError(selector.text, "not a device node")
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    link = roots.sys_path("dev", kind, f"{major}:{minor}")
    if not os.path.exists(link):
        raise NoSuchDevice(selector.text, f"no device in sysfs for {kind} {link.rsplit('/', 1)[1]}")
    real = os.path.realpath(link)
    if sysfs.is_usb_device_dir(real):
        return _usb_target(sysfs.read_usb_device(real))
    usb = sysfs.usb_ancestor(real, roots)
    if usb is not None:
        return _usb_target(sysfs.read_usb_device(usb))
    if kind != "block":
        raise SelectorError(selector.text, "not a USB device and not a block device")
    # A block device that is not on USB (a loop device): the whole disk is the target.
    name = os.path.basename(real)
    if os.path.exists(os.path.join(real, "partition")):
        real = os.path.dirname(real)
        name = os.path.basename(real)
    return Target(syspath=real, usb=None, block=name)
