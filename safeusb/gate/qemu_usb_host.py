"""Which host USB device a QEMU `usb-host` device names, and the decision to hand it over.

`device_add` arrives over QMP (JSON arguments) or inside `human-monitor-command`
(`device_add usb-host,hostbus=2,hostaddr=3`); qemuparse reads both as QEMU does. QEMU
7.2's usb-host (hw/usb/host-libusb.c) opens `hostdevice` (a path, possibly /dev/fdset/N)
if given; else, with hostbus and hostaddr and none of hostport, vendorid and productid,
exactly that device; else it keeps scanning the host for any device matching every
criterion given (0 matching anything) and takes one whenever it appears. The gate allows
only the first two forms.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from safeusb.errors import SafeUSBError
from safeusb.gate.qemuparse import (
    QemuSyntaxError,
    hmp_device_add_text,
    opts_dict,
    qemu_opts_items,
    qemu_strtol10,
    qemu_strtou64,
    qmp_opts,
)
from safeusb.host.usbfs import (
    FDSET_PREFIX,
    FdIdentity,
    through_proc,
    usbfs_busdev,
)
from safeusb.values import frozen


class RequestError(SafeUSBError):
    """A usb-host device whose host device cannot be told for certain."""


if TYPE_CHECKING:
    from safeusb.host.selector import Selector


@frozen
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


USB_HOST = "usb-host"
HOST_PROPS = ("hostbus", "hostaddr", "hostport", "vendorid", "productid", "hostdevice")
UNSEEN_FD = FdIdentity("an fd that did not come with its add-fd", None)
"""Stands for an fd QEMU may have put in a set that the gate did not see (an add-fd
without fds of its own takes whatever fds QEMU still holds from earlier messages)."""


def _uint32(name: str, text: str) -> int:
    """A uint32 usb-host property as QEMU's keyval visitor reads it (qemu_strtou64, base 0)."""
    value = qemu_strtou64(text)
    if value is None:
        raise RequestError(f"usb-host {name}={text!r} is not a number QEMU reads")
    if value > 0xFFFFFFFF:
        raise RequestError(f"usb-host {name}={text!r} is out of range (QEMU: uint32)")
    return value


def _show(value: str) -> str:
    return value if value.isprintable() and value.strip() == value else repr(value)


def usb_host_request(
    args: Mapping[str, Any],
    fdsets: Mapping[int, tuple[FdIdentity, ...]],
    domain: str | None = None,
    via: str = "device_add",
    stat_path: Callable[[str], os.stat_result] = os.stat,
) -> UsbHostRequest:
    """The host device a usb-host device's properties name, read as QEMU 7.2 reads them
    (JSON values become QemuOpts strings first). RequestError unless QEMU would open
    exactly one device now and never scan for another."""
    try:
        props = qmp_opts(args)
    except QemuSyntaxError as exc:
        raise RequestError(f"usb-host: {exc}") from None
    numbers = {name: _uint32(name, props[name])
               for name in ("hostbus", "hostaddr", "vendorid", "productid") if name in props}
    bus, addr = numbers.get("hostbus", 0), numbers.get("hostaddr", 0)
    vid, pid = numbers.get("vendorid", 0), numbers.get("productid", 0)
    port = props.get("hostport")
    hostdevice = props.get("hostdevice")
    dev_id = props.get("id") if isinstance(args.get("id"), str) else None
    if hostdevice is not None:
        # usb-host opens this path and ignores the other criteria
        bus, addr = _busdev_of_path(hostdevice, fdsets, stat_path)
        return UsbHostRequest(hostbus=bus, hostaddr=addr, hostdevice=hostdevice,
                              device_id=dev_id, domain=domain, via=via)
    if bus and addr and not vid and not pid and port is None:
        if addr > 127:
            raise RequestError(f"usb-host hostaddr={props['hostaddr']!r} is out of range "
                               "(USB addresses end at 127)")
        return UsbHostRequest(hostbus=bus, hostaddr=addr, device_id=dev_id, domain=domain,
                              via=via)
    if not (bus or addr or vid or pid) and port is None:
        raise RequestError("usb-host names no host device (QEMU would take any)")
    given = ",".join(f"{name}={_show(props[name])}" for name in HOST_PROPS if name in props)
    raise RequestError(f"usb-host {given}: QEMU would keep scanning for a matching device "
                       "and take one plugged in later; name one device by hostbus and "
                       "hostaddr alone, or by hostdevice")


def device_add_request(
    msg: Any,
    fdsets: Mapping[int, tuple[FdIdentity, ...]],
    domain: str | None = None,
    stat_path: Callable[[str], os.stat_result] = os.stat,
) -> UsbHostRequest | None:
    """The usb-host device a QMP message asks QEMU to add (QMP `device_add`, or an HMP
    `device_add` in `human-monitor-command`); None if it adds none. RequestError where
    the gate refuses (QEMU would read it otherwise, or might, or takes no single device)."""
    if not isinstance(msg, dict):
        return None
    name = msg.get("execute", msg.get("exec-oob"))
    args = msg.get("arguments")
    if not isinstance(args, dict):
        return None
    if name == "device_add":
        if args.get("driver") != USB_HOST:
            return None  # QEMU makes "usb-host" of no other JSON value
        return usb_host_request(args, fdsets, domain, stat_path=stat_path)
    if name == "human-monitor-command" and isinstance(args.get("command-line"), str):
        props = hmp_device_add(args["command-line"])
        if props is None or props.get("driver") != USB_HOST:
            return None
        return usb_host_request(props, fdsets, domain, via="human-monitor-command",
                                stat_path=stat_path)
    return None


def _path(path: str, limit: int = 160) -> str:
    """A path for a one-line message."""
    return repr(path) if len(path) <= limit else repr(path[:limit]) + "..."


def _busdev_of_path(
    path: str,
    fdsets: Mapping[int, tuple[FdIdentity, ...]],
    stat_path: Callable[[str], os.stat_result],
) -> tuple[int, int]:
    try:
        path.encode()
    except UnicodeEncodeError:
        raise RequestError(f"usb-host hostdevice={_path(path)}: not UTF-8 text") from None
    if path.startswith(FDSET_PREFIX):
        # qemu_open: the rest is an fd set number in base 10 (qemu_parse_fd)
        number = path[len(FDSET_PREFIX):]
        fdset = qemu_strtol10(number)
        if fdset is None:
            raise RequestError(f"usb-host hostdevice={_path(path)}: {number!r} is not an fd set "
                               "number QEMU reads")
        idents = fdsets.get(fdset)
        if not idents:
            raise RequestError(f"usb-host hostdevice={_path(path)}: fd set {fdset} was never seen")
        found = {i.usb_busdev for i in idents}
        if None in found:
            paths = ", ".join(sorted({i.path for i in idents if i.usb_busdev is None}))
            raise RequestError(f"usb-host hostdevice={_path(path)}: fd set {fdset} holds what is "
                               f"not a USB device node ({paths})")
        if len(found) != 1:
            raise RequestError(f"usb-host hostdevice={_path(path)}: fd set {fdset} has held "
                               "several devices (QEMU may open any of them)")
        busdev = found.pop()
        assert busdev is not None
        return busdev
    if not path.startswith("/"):
        raise RequestError(f"usb-host hostdevice={_path(path)}: not an absolute path "
                           "(QEMU would open it relative to its own directory)")
    if "\0" in path:
        raise RequestError(f"usb-host hostdevice={_path(path)}: QEMU reads U+0000 as other bytes")
    named = usbfs_busdev(path)
    if named is not None:
        return named
    if through_proc(path):
        raise RequestError(f"usb-host hostdevice={_path(path)}: leads through /proc, where QEMU "
                           "would see its own files, not the gate's")
    try:
        st = stat_path(path)
    except OSError as exc:
        raise RequestError(f"usb-host hostdevice={_path(path)}: {exc.strerror or exc}") from None
    ident = FdIdentity(
        path, (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISCHR(st.st_mode) else None
    )
    busdev = ident.usb_busdev
    if busdev is None:
        raise RequestError(f"usb-host hostdevice={_path(path)}: not a USB device node")
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
    """The properties of an HMP `device_add` as QEMU reads them; None if the line runs
    another command or QEMU would add nothing without a doubt (help). RequestError where
    QEMU refuses the line, cuts it short, or a usb-host gives a property more than once."""
    try:
        text = hmp_device_add_text(command_line)
    except QemuSyntaxError as exc:
        raise RequestError(str(exc)) from None
    if text is None:
        return None
    items, help_wanted = qemu_opts_items(text)
    props, twice = opts_dict(items)
    drivers = {value for name, value in items if name == "driver"}
    if help_wanted:
        if USB_HOST in drivers or not drivers:
            raise RequestError("device_add: asks for help; the gate passes no such usb-host")
        return None
    if USB_HOST in drivers and twice:
        raise RequestError(f"device_add: {', '.join(sorted(twice))} given more than once")
    return props


def request_selector(request: UsbHostRequest) -> Selector:
    """The selector naming the host device a usb-host request asks for."""
    from safeusb.host.selector import Selector  # noqa: PLC0415 (the gate starts fast without it)

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


# Error kinds whose message is prepare's own account (the reasons, or the state the host
# was left in): passed on as they are. Others say they come from safeusbd.
_PREPARE_KINDS = ("refused", "failed", "no-such-device", "bad-selector", "busy", "policy",
                  "state")


def prepare_decision(request: UsbHostRequest, cancel: threading.Event,
                     socket_path: str | None = None) -> None:
    """The gate's decision: safeusbd runs `prepare` for the device under the host policy
    for the domain; the device goes to the guest only when it is free or made free.

    The gate runs as QEMU's user, unprivileged and confined under a stock libvirt, so it
    only asks. When ``cancel`` is set the daemon is told to cancel, and its answer is
    still awaited: it comes once prepare has undone what it did. No daemon: refused,
    nothing done (DaemonUnavailable says how to start it)."""
    from safeusb.safeusbd.client import DaemonError, ask  # noqa: PLC0415
    from safeusb.safeusbd.protocol import DEFAULT_SOCKET  # noqa: PLC0415

    if request.hostbus is None or request.hostaddr is None:
        raise RequestError(f"{request.describe()}: names no single device by bus and address")
    args: dict[str, Any] = {"bus": request.hostbus, "addr": request.hostaddr}
    if request.domain is not None:
        args["domain"] = request.domain
    try:
        ask("prepare", args, socket_path or DEFAULT_SOCKET, cancel=cancel)
    except DaemonError as exc:
        raise SafeUSBError(exc.message if exc.kind in _PREPARE_KINDS else str(exc)) from None


def inspect_decision(request: UsbHostRequest, cancel: threading.Event) -> None:
    """Refuse unless `safeusb inspect` finds the device free (changes nothing)."""
    from safeusb.host.roots import Roots  # noqa: PLC0415
    from safeusb.host.runner import Runner  # noqa: PLC0415
    from safeusb.host.selector import resolve  # noqa: PLC0415
    from safeusb.host.snapshot import read_snapshot  # noqa: PLC0415
    from safeusb.inspect.decide import inspect  # noqa: PLC0415 (the gate starts fast without it)

    sel = request_selector(request)
    roots = Roots.host()
    # The gate runs in QEMU's confinement: no bpf() from there (the /proc scan finds the
    # same, and a refused bpf() would only fill the audit log).
    target = resolve(sel, roots)
    Runner.for_roots(roots).ensure_debugfs(roots)
    findings = inspect(read_snapshot(roots, target, kernel_scan=False))
    if not findings.free:
        raise SafeUSBError("; ".join(r.text for r in findings.reasons))
