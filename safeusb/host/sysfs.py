"""Reading sysfs: USB devices, the nodes under them and the block device graph."""

from __future__ import annotations

import os

from safeusb.errors import SystemReadError
from safeusb.host.model import (
    BlockDevice,
    DevNum,
    LoopSetup,
    Node,
    NodeKind,
    UsbDevice,
    UsbInterface,
)
from safeusb.host.parsers import ParseError, parse_devnum
from safeusb.host.roots import Roots
from safeusb.values import frozen

USBFS = "usbfs"  # the driver usbfs binds to an interface claimed through the node


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _read_int(path: str, base: int = 10) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def read_uevent(path: str) -> dict[str, str]:
    text = _read(os.path.join(path, "uevent")) or ""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def is_usb_device_dir(path: str) -> bool:
    """A USB device (not an interface): has idVendor and busnum."""
    return os.path.exists(os.path.join(path, "idVendor")) and os.path.exists(
        os.path.join(path, "busnum")
    )


def port_path(roots: Roots, key: str) -> str:
    """The sysfs directory of the USB device at port ``key`` ("2-1")."""
    return roots.sys_path("bus", "usb", "devices", key)


def usb_device_at(roots: Roots, key: str) -> UsbDevice | None:
    """The USB device at port ``key``; None when no device is there."""
    path = port_path(roots, key)
    return read_usb_device(path) if is_usb_device_dir(path) else None


def usb_port_names(roots: Roots) -> list[str]:
    """Every name under /sys/bus/usb/devices (devices and their interfaces), sorted."""
    try:
        return sorted(os.listdir(roots.sys_path("bus", "usb", "devices")))
    except OSError:
        return []


def usb_device_address(roots: Roots, name: str) -> tuple[int, int] | None:
    """The bus and device number of the USB device of that name under
    /sys/bus/usb/devices; None for an interface, or one that left."""
    if ":" in name:
        return None
    path = port_path(roots, name)
    bus, dev = _read_int(os.path.join(path, "busnum")), _read_int(os.path.join(path, "devnum"))
    return None if bus is None or dev is None else (bus, dev)


def has_usb(roots: Roots) -> bool:
    """Whether the kernel has a USB subsystem."""
    return os.path.isdir(roots.sys_path("bus", "usb"))


def whole_disks_under(roots: Roots, key: str) -> list[str]:
    """The names of the whole block devices under the USB device at port ``key``."""
    real = os.path.realpath(port_path(roots, key))
    return sorted(name for n in nodes_under(real) if n.kind == "block"
                  and (name := os.path.basename(n.devname)) == whole_disk_name(name))


def whole_disk_name(name: str) -> str:
    """The whole disk of a SCSI disk's partition name ("sda1" -> "sda"); others as given."""
    return name.rstrip("0123456789") if name.startswith("sd") else name


def block_exists(roots: Roots, name: str) -> bool:
    return os.path.exists(roots.sys_path("class", "block", name))


def apparmor_enabled(roots: Roots) -> bool:
    """Whether the kernel runs AppArmor (its module parameter)."""
    return _read(roots.sys_path("module", "apparmor", "parameters", "enabled")) == "Y"


def read_usb_device(path: str) -> UsbDevice:
    """Read the USB device at a real sysfs path."""
    real = os.path.realpath(path)
    busnum = _read_int(os.path.join(real, "busnum"))
    devnum = _read_int(os.path.join(real, "devnum"))
    vendor = _read_int(os.path.join(real, "idVendor"), 16)
    product = _read_int(os.path.join(real, "idProduct"), 16)
    if busnum is None or devnum is None or vendor is None or product is None:
        raise SystemReadError(real, "not a readable USB device")
    interfaces = []
    sysname = os.path.basename(real)
    for entry in sorted(os.listdir(real)):
        # "2-1:1.0"; a root hub usbN has "N-0:1.0"
        ipath = os.path.join(real, entry)
        if ":" in entry and os.path.exists(os.path.join(ipath, "bInterfaceClass")):
            interfaces.append(
                UsbInterface(
                    name=entry,
                    interface_class=_read_int(os.path.join(ipath, "bInterfaceClass"), 16) or 0,
                    driver=_link_name(os.path.join(ipath, "driver")),
                )
            )
    return UsbDevice(
        sysname=sysname,
        syspath=real,
        busnum=busnum,
        devnum=devnum,
        vendor_id=vendor,
        product_id=product,
        serial=_read(os.path.join(real, "serial")),
        manufacturer=_read(os.path.join(real, "manufacturer")),
        product=_read(os.path.join(real, "product")),
        device_class=_read_int(os.path.join(real, "bDeviceClass"), 16) or 0,
        interfaces=tuple(interfaces),
    )


def list_usb_devices(roots: Roots, sysname: str | None = None, bus: int | None = None,
                     device: int | None = None) -> tuple[UsbDevice, ...]:
    """Every USB device on the system (root hubs included), by sysfs name; only those of
    the given sysfs name, bus and device number, when given (the others are not read
    further than that)."""
    base = roots.sys_path("bus", "usb", "devices")
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise SystemReadError(base, exc.strerror or str(exc)) from None
    devices = []
    for name in names:
        if ":" in name or (sysname is not None and name != sysname):
            continue
        path = os.path.join(base, name)
        if (bus is not None and _read_int(os.path.join(path, "busnum")) != bus) or \
                (device is not None and _read_int(os.path.join(path, "devnum")) != device):
            continue
        if is_usb_device_dir(path):
            try:
                devices.append(read_usb_device(path))
            except SystemReadError:
                continue  # unplugged while listing
    return tuple(devices)


def usb_ancestor(path: str, roots: Roots) -> str | None:
    """The nearest USB device directory above a real sysfs path (not a root hub)."""
    top = os.path.realpath(roots.sys)
    cur = os.path.dirname(os.path.realpath(path))
    while cur.startswith(top) and cur != top:
        if is_usb_device_dir(cur) and not os.path.basename(cur).startswith("usb"):
            return cur
        cur = os.path.dirname(cur)
    return None


# Never a device below these: a device's power attributes, and the block layer's own
# directories in a disk's or partition's.
_NOT_DEVICES = frozenset({"power"})
_BLOCK_INNER = _NOT_DEVICES | {"queue", "mq", "integrity", "trace", "holders", "slaves"}


@frozen
class DeviceDirs:
    """What one walk of a sysfs device's directory finds below it."""

    nodes: tuple[Node, ...]  # every device node (block, sg, usb, tty, ...)
    net: tuple[str, ...]  # the "net" class directories (one per network function)


def walk_device(syspath: str) -> DeviceDirs:
    """Walk below a sysfs device once (never into links: subsystem, driver, port, ...)."""
    nodes = []
    net = []
    for dirpath, dirnames, filenames in os.walk(syspath):
        skip = _NOT_DEVICES
        if "dev" in filenames and "uevent" in filenames:
            ev = read_uevent(dirpath)
            devname = ev.get("DEVNAME")
            num_text = _read(os.path.join(dirpath, "dev"))
            subsystem = _link_name(os.path.join(dirpath, "subsystem")) or ""
            if subsystem == "block":
                skip = _BLOCK_INNER
            if devname and num_text:
                try:
                    num = parse_devnum(num_text)
                except ParseError:
                    pass
                else:
                    kind: NodeKind = "block" if subsystem == "block" else "char"
                    nodes.append(Node(kind, num, devname, subsystem))
        if "net" in dirnames:
            net.append(os.path.join(dirpath, "net"))
        dirnames[:] = [d for d in dirnames if d not in skip]
    return DeviceDirs(tuple(sorted(nodes, key=lambda n: (n.kind, n.devnum))), tuple(net))


def nodes_under(syspath: str) -> tuple[Node, ...]:
    """Every device node provided below a sysfs device (block, sg, usb, tty, ...)."""
    return walk_device(syspath).nodes


def read_block_device(roots: Roots, name: str) -> BlockDevice | None:
    path = roots.sys_path("class", "block", name)
    num_text = _read(os.path.join(path, "dev"))
    if num_text is None:
        return None
    try:
        devnum = parse_devnum(num_text)
    except ParseError:
        return None
    ev = read_uevent(path)
    devtype = ev.get("DEVTYPE", "disk")
    parent = None
    if devtype == "partition":
        parent = os.path.basename(os.path.dirname(os.path.realpath(path)))

    def listing(sub: str) -> tuple[str, ...]:
        try:
            return tuple(sorted(os.listdir(os.path.join(path, sub))))
        except OSError:
            return ()

    bdi_link = _link_name(os.path.join(path, "bdi"))
    bdi: DevNum | None = None
    if bdi_link:
        try:
            bdi = parse_devnum(bdi_link)
        except ParseError:
            bdi = None
    sectors = _read_int(os.path.join(path, "size")) or 0
    backing = _read(os.path.join(path, "loop", "backing_file"))
    return BlockDevice(
        name=name,
        devnum=devnum,
        devtype=devtype,
        size_bytes=sectors * 512,
        parent=parent,
        holders=listing("holders"),
        slaves=listing("slaves"),
        dm_name=_read(os.path.join(path, "dm", "name")),
        dm_uuid=_read(os.path.join(path, "dm", "uuid")),
        md_level=_read(os.path.join(path, "md", "level")),
        loop_backing_file=backing,
        loop=_read_loop(path) if backing is not None else None,
        bdi=bdi,
    )


def _read_loop(path: str) -> LoopSetup:
    def number(*parts: str) -> int:
        return _read_int(os.path.join(path, *parts)) or 0

    return LoopSetup(
        offset=number("loop", "offset"),
        sizelimit=number("loop", "sizelimit"),
        read_only=number("ro") == 1,
        partscan=number("loop", "partscan") == 1,
        direct_io=number("loop", "dio") == 1,
        autoclear=number("loop", "autoclear") == 1,
        sector_size=number("queue", "logical_block_size") or 512,
    )


def all_block_names(roots: Roots) -> tuple[str, ...]:
    base = roots.sys_path("class", "block")
    try:
        return tuple(sorted(os.listdir(base)))
    except OSError as exc:
        raise SystemReadError(base, exc.strerror or str(exc)) from None


def block_name_for_syspath(path: str) -> str | None:
    """The kernel name of a block device given its sysfs directory."""
    if os.path.exists(os.path.join(path, "dev")) and os.path.islink(
        os.path.join(path, "subsystem")
    ):
        if _link_name(os.path.join(path, "subsystem")) == "block":
            return os.path.basename(path)
    return None


def possible_cpus(roots: Roots) -> int:
    """Number of possible CPUs (/sys/devices/system/cpu/possible, e.g. "0-3")."""
    text = _read(roots.sys_path("devices", "system", "cpu", "possible"))
    if not text:
        return 0
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            count += (int(hi) if hi else int(lo)) - int(lo) + 1
        except ValueError:
            return 0
    return count


def writeback_counter_slack(roots: Roots) -> int:
    """Largest error of a per-device writeback counter as debugfs shows it, in bytes.

    The kernel keeps them as per-CPU counters with a batch of 8 * (1 + ilog2(CPUs)) pages
    and shows the global part only (mm/backing-dev.c, include/linux/backing-dev-defs.h)."""
    cpus = possible_cpus(roots)
    if cpus <= 0:
        return 0
    batch = 8 * (1 + (cpus.bit_length() - 1))
    return batch * cpus * os.sysconf("SC_PAGE_SIZE")


def split_lvm_name(dm_name: str) -> tuple[str, str]:
    """Split a device-mapper name "vg-lv" (dashes doubled inside names) into (vg, lv)."""
    i = 0
    while i < len(dm_name):
        if dm_name[i] == "-":
            if i + 1 < len(dm_name) and dm_name[i + 1] == "-":
                i += 2
                continue
            return dm_name[:i].replace("--", "-"), dm_name[i + 1 :].replace("--", "-")
        i += 1
    return "", ""


@frozen
class DeviceNow:
    """The USB device at a port now: its usbfs node's device number and each interface's
    driver (None: no driver)."""

    dev: str  # "189:130"
    drivers: dict[str, str | None]

    @property
    def claimed(self) -> bool:
        return USBFS in self.drivers.values()


def device_now(roots: Roots, key: str) -> DeviceNow | None:
    """The device at port ``key`` (``2-1``), or None when nothing is there."""
    port = port_path(roots, key)
    if not is_usb_device_dir(port):
        return None
    real = os.path.realpath(port)
    dev = _read(os.path.join(real, "dev"))
    if dev is None:
        return None
    try:
        names = os.listdir(real)
    except OSError:
        return None
    return DeviceNow(dev, {name: _link_name(os.path.join(real, name, "driver"))
                           for name in names if name.startswith(f"{key}:")})
