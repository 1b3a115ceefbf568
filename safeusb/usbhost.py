"""Which host USB device a QEMU `usb-host` device names, and the decision to hand it over.

`device_add` arrives over QMP (JSON arguments) or inside `human-monitor-command`
(`device_add usb-host,hostbus=2,hostaddr=3`). QEMU's usb-host finds its device by
`hostdevice` (a path, possibly /dev/fdset/N), else by every criterion given among
hostbus, hostaddr, hostport, vendorid and productid.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import SafeUSBError

USB_DEVICE_MAJOR = 189
_DEV_BUS_USB = re.compile(r"^/dev/bus/usb/(\d{3})/(\d{3})$")
_FDSET = re.compile(r"^/dev/fdset/(\d+)$")
_PORT = re.compile(r"^\d+(\.\d+)*$")


class RequestError(SafeUSBError):
    """A usb-host device whose host device cannot be told for certain."""


if TYPE_CHECKING:
    from .selector import Selector


@dataclass(frozen=True)
class FdIdentity:
    """What an fd passed to QEMU (add-fd, getfd) refers to."""

    path: str
    rdev: tuple[int, int] | None  # (major, minor) of a character device

    @property
    def usb_busdev(self) -> tuple[int, int] | None:
        if self.rdev is None or self.rdev[0] != USB_DEVICE_MAJOR:
            return None
        minor = self.rdev[1]
        return minor // 128 + 1, minor % 128 + 1


def fd_identity(fd: int) -> FdIdentity:
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        path = f"fd {fd}"
    try:
        st = os.fstat(fd)
    except OSError:
        return FdIdentity(path, None)
    rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISCHR(st.st_mode) else None
    return FdIdentity(path, rdev)


@dataclass(frozen=True)
class UsbHostRequest:
    """A usb-host device the guest is about to get. bus/addr are set when known exactly."""

    hostbus: int | None = None
    hostaddr: int | None = None
    hostport: str | None = None
    hostdevice: str | None = None
    vendorid: int | None = None
    productid: int | None = None
    device_id: str | None = None  # the qdev id
    domain: str | None = None
    via: str = "device_add"  # or "human-monitor-command"

    def describe(self) -> str:
        parts = []
        if self.hostdevice is not None:
            parts.append(f"hostdevice={self.hostdevice}")
        for name in ("hostbus", "hostaddr", "hostport"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value}")
        if self.vendorid is not None:
            parts.append(f"vendorid=0x{self.vendorid:04x}")
        if self.productid is not None:
            parts.append(f"productid=0x{self.productid:04x}")
        return "usb-host " + ",".join(parts)


Decide = Callable[[UsbHostRequest, threading.Event], None]
"""Returns to allow; raises SafeUSBError (message = the reason) to refuse. The event is set
when the requester gives up waiting: stop, put the host back as it was, and refuse."""


def _uint(name: str, value: Any, limit: int) -> int:
    if isinstance(value, bool):
        raise RequestError(f"usb-host {name}={value!r} is not a number")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            number = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
        except ValueError:
            raise RequestError(f"usb-host {name}={value!r} is not a number") from None
    else:
        raise RequestError(f"usb-host {name}={value!r} is not a number")
    if not 0 <= number <= limit:
        raise RequestError(f"usb-host {name}={value!r} is out of range")
    return number


def usb_host_request(
    args: Mapping[str, Any],
    fdsets: Mapping[int, tuple[FdIdentity, ...]],
    domain: str | None = None,
    via: str = "device_add",
    stat_path: Callable[[str], os.stat_result] = os.stat,
) -> UsbHostRequest:
    """The request a usb-host device's properties make, resolved as far as QEMU would."""
    bus = addr = vid = pid = None
    port = None
    hostdevice = args.get("hostdevice")
    if hostdevice is not None and not isinstance(hostdevice, str):
        raise RequestError(f"usb-host hostdevice={hostdevice!r} is not a path")
    if "hostbus" in args:
        bus = _uint("hostbus", args["hostbus"], 0xFFFFFFFF)
    if "hostaddr" in args:
        addr = _uint("hostaddr", args["hostaddr"], 0xFFFFFFFF)
    if "hostport" in args:
        port = args["hostport"]
        if not isinstance(port, str) or not _PORT.match(port):
            raise RequestError(f"usb-host hostport={port!r} is not a port path")
    if "vendorid" in args:
        vid = _uint("vendorid", args["vendorid"], 0xFFFF)
    if "productid" in args:
        pid = _uint("productid", args["productid"], 0xFFFF)
    raw_id = args.get("id")
    dev_id = raw_id if isinstance(raw_id, str) else None
    if hostdevice:
        bus, addr = _busdev_of_path(hostdevice, fdsets, stat_path)
        return UsbHostRequest(hostbus=bus, hostaddr=addr, hostdevice=hostdevice,
                              device_id=dev_id, domain=domain, via=via)
    if bus == 0:
        bus = None  # QEMU: 0 means any
    if addr == 0:
        addr = None
    if vid == 0:
        vid = None
    if pid == 0:
        pid = None
    if addr is not None and bus is None:
        raise RequestError("usb-host hostaddr without hostbus names no single device")
    if port is not None and bus is None:
        raise RequestError("usb-host hostport without hostbus names no single device")
    if bus is None and vid is None and pid is None:
        raise RequestError("usb-host names no host device (QEMU would take any)")
    if addr is None and port is None and (vid is None or pid is None):
        raise RequestError("usb-host names no single device: give hostbus and hostaddr, "
                           "hostbus and hostport, or vendorid and productid")
    return UsbHostRequest(hostbus=bus, hostaddr=addr, hostport=port, vendorid=vid,
                          productid=pid, device_id=dev_id, domain=domain, via=via)


def _busdev_of_path(
    path: str,
    fdsets: Mapping[int, tuple[FdIdentity, ...]],
    stat_path: Callable[[str], os.stat_result],
) -> tuple[int, int]:
    m = _FDSET.match(path)
    if m:
        fdset = int(m.group(1))
        idents = fdsets.get(fdset)
        if not idents:
            raise RequestError(f"usb-host hostdevice={path}: fd set {fdset} was never seen")
        found = {i.usb_busdev for i in idents}
        if None in found:
            paths = ", ".join(sorted(i.path for i in idents if i.usb_busdev is None))
            raise RequestError(f"usb-host hostdevice={path}: not a USB device node ({paths})")
        if len(found) != 1:
            raise RequestError(f"usb-host hostdevice={path}: fd set holds several devices")
        busdev = found.pop()
        assert busdev is not None
        return busdev
    m = _DEV_BUS_USB.match(os.path.normpath(path))
    if m and path == os.path.normpath(path):
        return int(m.group(1)), int(m.group(2))
    try:
        st = stat_path(path)
    except OSError as exc:
        raise RequestError(f"usb-host hostdevice={path}: {exc.strerror or exc}") from None
    ident = FdIdentity(
        path, (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISCHR(st.st_mode) else None
    )
    busdev = ident.usb_busdev
    if busdev is None:
        raise RequestError(f"usb-host hostdevice={path}: not a USB device node")
    return busdev


def split_qemu_opts(text: str) -> list[str]:
    """QemuOpts text (a,b=c,d=e) into items; ',,' is a literal comma."""
    items, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text.startswith(",,", i):
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return items


def hmp_device_add(command_line: str) -> dict[str, str] | None:
    """The properties of an HMP `device_add`, or None if the command is something else."""
    words = command_line.strip().split(None, 1)
    if not words or words[0] != "device_add":
        return None
    if len(words) == 1:
        return {}
    props: dict[str, str] = {}
    for n, item in enumerate(split_qemu_opts(words[1].strip())):
        key, sep, value = item.partition("=")
        if not sep:
            if n == 0:
                key, value = "driver", item
            else:
                key, value = item, "on"
        if key in props:
            raise RequestError(f"device_add: {key} given twice")
        props[key] = value
    return props


def request_selector(request: UsbHostRequest) -> Selector:
    """The selector naming the host device a usb-host request asks for."""
    from .selector import Selector  # noqa: PLC0415 (the gate starts fast without it)

    if request.hostaddr is not None and request.hostbus is not None:
        return Selector(
            f"{request.hostbus:03d}:{request.hostaddr:03d}", bus=request.hostbus,
            device=request.hostaddr, vendor_id=request.vendorid, product_id=request.productid,
        )
    if request.hostport is not None and request.hostbus is not None:
        name = f"{request.hostbus}-{request.hostport}"
        return Selector(
            name, sysname=name, vendor_id=request.vendorid, product_id=request.productid
        )
    return Selector(
        request.describe(), bus=request.hostbus,
        vendor_id=request.vendorid, product_id=request.productid,
    )


def prepare_decision(request: UsbHostRequest, cancel: threading.Event) -> None:
    """The gate's decision: `safeusb prepare` under the host policy for the domain; the
    device goes to the guest only when it is free or made free."""
    from .act import prepare  # noqa: PLC0415
    from .policy import DEFAULT_PATH, Policy  # noqa: PLC0415
    from .roots import Roots  # noqa: PLC0415
    from .run import Runner  # noqa: PLC0415
    from .selector import resolve  # noqa: PLC0415
    from .state import StateDir  # noqa: PLC0415

    roots = Roots.host()
    target = resolve(request_selector(request), roots)
    outcome = prepare(roots, target, Policy.from_file(DEFAULT_PATH),
                      Runner.for_roots(roots, cancel=cancel), StateDir(),
                      domain=request.domain)
    if outcome.ok:
        return
    raise SafeUSBError("; ".join(outcome.why_not()))


def inspect_decision(request: UsbHostRequest, cancel: threading.Event) -> None:
    """Refuse unless `safeusb inspect` finds the device free (changes nothing)."""
    from .inspect import inspect  # noqa: PLC0415 (the gate starts fast without it)
    from .roots import Roots  # noqa: PLC0415
    from .run import Runner  # noqa: PLC0415
    from .selector import resolve  # noqa: PLC0415
    from .snapshot import read_snapshot  # noqa: PLC0415

    sel = request_selector(request)
    roots = Roots.host()
    findings = inspect(read_snapshot(roots, resolve(sel, roots), Runner()))
    if not findings.free:
        raise SafeUSBError("; ".join(r.text for r in findings.reasons))
