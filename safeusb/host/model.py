"""The device model: what was read from the system, as frozen dataclasses."""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from safeusb.values import frozen

DevNum = tuple[int, int]
NodeKind = Literal["block", "char"]


def fmt_devnum(num: DevNum) -> str:
    return f"{num[0]}:{num[1]}"



DEV = "/dev/"  # where devtmpfs puts the nodes the kernel names


def node(name: str) -> str:
    """The path of the node the kernel names ``name`` ("sda1", "bus/usb/002/003")."""
    return DEV + name

@frozen
class UsbInterface:
    name: str  # "2-1:1.0"
    interface_class: int
    driver: str | None


@frozen
class UsbDevice:
    sysname: str  # "2-1"
    syspath: str  # real path inside the sys root
    busnum: int
    devnum: int
    vendor_id: int
    product_id: int
    serial: str | None = None
    manufacturer: str | None = None
    product: str | None = None
    device_class: int = 0
    interfaces: tuple[UsbInterface, ...] = ()

    @property
    def vid_pid(self) -> str:
        return f"{self.vendor_id:04x}:{self.product_id:04x}"

    def describe(self) -> str:
        name = " ".join(p for p in (self.manufacturer, self.product) if p)
        text = f"{self.sysname} (bus {self.busnum:03d} device {self.devnum:03d}, {self.vid_pid}"
        if name:
            text += f" {name}"
        if self.serial:
            text += f", serial {self.serial}"
        return text + ")"


@frozen
class Node:
    """A device node provided by the device (block, sg, usb, tty, video, ...)."""

    kind: NodeKind
    devnum: DevNum
    devname: str  # as under /dev: "sda1", "bus/usb/002/003", "sg0"
    subsystem: str

    @property
    def path(self) -> str:
        return node(self.devname)


@frozen
class LoopSetup:
    """How a loop device is attached (sysfs loop/ and queue/), to attach it again alike."""

    offset: int = 0
    sizelimit: int = 0
    read_only: bool = False
    partscan: bool = False
    direct_io: bool = False
    autoclear: bool = False  # set up by mount -o loop: detached with its last close
    sector_size: int = 512


@frozen
class BlockDevice:
    name: str  # kernel name: "sda1", "dm-0"
    devnum: DevNum
    devtype: str  # "disk" or "partition"
    size_bytes: int
    parent: str | None = None  # the disk of a partition
    holders: tuple[str, ...] = ()
    slaves: tuple[str, ...] = ()
    dm_name: str | None = None
    dm_uuid: str | None = None
    md_level: str | None = None
    loop_backing_file: str | None = None
    loop: LoopSetup | None = None  # read for bound loop devices
    bdi: DevNum | None = None  # whose writeback statistics account for this device

    @property
    def path(self) -> str:
        return node(self.name)

    @property
    def kind(self) -> str:
        if self.devtype == "partition":
            return "partition"
        if self.dm_uuid is not None or self.name.startswith("dm-"):
            uuid = self.dm_uuid or ""
            if uuid.startswith("CRYPT-"):
                return "dm-crypt"
            if uuid.startswith("LVM-"):
                return "lvm"
            return "dm"
        if self.md_level is not None or self.name.startswith("md"):
            return "md"
        if self.name.startswith("loop"):
            return "loop"
        if self.name.startswith("bcache"):
            return "bcache"
        return "disk"

    def label(self) -> str:
        """Name for people: "dm-0 (luks-1234)"."""
        if self.dm_name:
            return f"{self.name} ({self.dm_name})"
        return self.name


@frozen
class MountEntry:
    mount_id: int
    parent_id: int
    devnum: DevNum
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str


@frozen
class MountNamespace:
    inode: int
    pid: int  # one process in the namespace
    comm: str
    mounts: tuple[MountEntry, ...]


@frozen
class SwapEntry:
    filename: str
    swap_type: str  # "partition" or "file"
    size_kib: int
    used_kib: int
    devnum: DevNum | None  # the block device (partition) or the filesystem (file)


UseKind = Literal["fd", "cwd", "root", "exe", "mmap"]


@frozen
class ProcessUse:
    pid: int
    comm: str
    how: UseKind
    path: str  # what the process sees: "/dev/sda", "/mnt/file"
    node: tuple[NodeKind, DevNum] | None = None  # a device node held open
    fs: DevNum | None = None  # a file on this filesystem


@frozen
class DirtyStat:
    bdi: DevNum
    dirty_bytes: int | None
    writeback_bytes: int | None
    error: str | None = None


@frozen
class Unreadable:
    what: str
    error: str


@frozen
class Target:
    """What is to be handed over: a USB device, or (for tests) a plain block device."""

    syspath: str
    usb: UsbDevice | None
    block: str | None = None  # the whole block device when not on USB

    def describe(self) -> str:
        if self.usb is not None:
            return self.usb.describe()
        return f"{node(str(self.block))} (not a USB device)"


@frozen
class Snapshot:
    """Everything read from the system about one target, read once."""

    target: Target
    nodes: tuple[Node, ...]
    blocks: dict[str, BlockDevice]  # the target's block devices and their holders
    namespaces: tuple[MountNamespace, ...]
    swaps: tuple[SwapEntry, ...]
    uses: tuple[ProcessUse, ...]
    dirty: tuple[DirtyStat, ...]
    exclusive_busy: tuple[str, ...]  # block devices that refused an O_EXCL open
    fs_devices: dict[DevNum, str]  # filesystem device number -> block device it lives on
    backed_loops: tuple[str, ...] = ()  # loop devices backed by a file on these filesystems
    # For each of them, the filesystem (a key of fs_devices) its backing file lies on.
    loop_fs: dict[str, DevNum] = field(default_factory=dict)
    unreadable: tuple[Unreadable, ...] = field(default=())
    # The kernel's per-device writeback counters are per-CPU sums read without folding:
    # each may be off by this many bytes (WB_STAT_BATCH pages per possible CPU).
    counter_slack_bytes: int = 0
    # Network interfaces, input devices, mode switching (below; read by usb_classes.py);
    # None when not read.
    classes: ClassSnapshot | None = None


# ---------------------------------------------------------------------------------------
# Beyond storage: what netinfo.py, inputdev.py and modeswitch.py read (usb_classes.py)

RTPROT_KERNEL = 2  # rtnetlink route protocols: a connected route
RTPROT_RA = 9  # learnt from a router advertisement


@frozen
class LinkId:
    """What identifies an interface, as a matcher sees it."""

    netns: int  # inode of its network namespace
    ifindex: int
    name: str
    parent_dev: str | None = None  # kernel name of the device below it ("2-1:1.0")
    parent_bus: str | None = None  # its bus ("usb")
    address: str | None = None
    perm_address: str | None = None


@frozen
class NetAddress:
    family: int  # 4 or 6
    address: str
    prefixlen: int
    scope: str  # "global", "link", "host", ...
    permanent: bool = True  # configured by hand; False: a lifetime (DHCP, SLAAC) runs out

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"


@frozen
class NetRoute:
    family: int  # 4 or 6
    dst: str  # "default" or "10.0.0.0/8"
    gateway: str | None
    table: int
    protocol: int = 4  # rtnetlink's rtm_protocol: 2 kernel, 3 boot, 4 static, 9 RA, 16 DHCP

    @property
    def is_default(self) -> bool:
        return self.dst == "default"

    @property
    def configured(self) -> bool:
        """Put there by an administrator or a tool, not by the kernel (connected routes)
        or router advertisements: what comes back only if someone adds it again."""
        return self.protocol not in (RTPROT_KERNEL, RTPROT_RA)


@frozen
class NetInterface:
    link: LinkId
    kind: str | None  # rtnetlink link kind: "vlan", "bridge", ...; None for plain NICs
    up: bool  # administratively up
    operstate: str
    master: str | None = None
    master_kind: str | None = None
    lower: str | None = None  # for a stacked interface (VLAN, macvlan): the device's one below
    lower_netns: int | None = None  # where that one is, when another namespace
    uppers: tuple[str, ...] = ()
    addresses: tuple[NetAddress, ...] = ()
    routes: tuple[NetRoute, ...] = ()  # default routes first
    rx_bytes: int | None = None
    tx_bytes: int | None = None

    @property
    def name(self) -> str:
        return self.link.name

    @property
    def netns(self) -> int:
        return self.link.netns


@frozen
class NetNamespaceRef:
    inode: int
    where: str  # "pid 812 (dockerd)", "/run/netns/blue"
    path: str = ""  # a file that refers to it: "/proc/812/ns/net", "/run/netns/blue"


@frozen
class NetScan:
    """The device's interfaces (and those stacked on them) in every namespace reached."""

    interfaces: tuple[NetInterface, ...] = ()
    namespaces: tuple[NetNamespaceRef, ...] = ()  # every namespace that was read
    # How many interfaces the device has over all namespaces (sysfs), None when unknown.
    expected: int | None = 0
    unreadable: tuple[Unreadable, ...] = ()

    def where(self, inode: int) -> str | None:
        return next((n.where for n in self.namespaces if n.inode == inode), None)


@frozen
class InputDevice:
    sysname: str  # "input5"
    name: str  # what the device calls itself: "QEMU QEMU USB Keyboard"
    keyboard: bool
    pointer: bool
    on_target: bool
    # Its events are dropped (sysfs "inhibited", Linux 5.11 and later): no use as a keyboard
    # or pointer until someone lifts that.
    inhibited: bool = False


@frozen
class InputScan:
    devices: tuple[InputDevice, ...] = ()  # every keyboard and pointer, and the target's
    unreadable: tuple[Unreadable, ...] = ()


Id = tuple[int, int]  # vendor, product


@frozen
class SwitchDb:
    """Devices usb_modeswitch switches: their storage-mode ids and what they become."""

    switches_to: dict[Id, tuple[Id, ...]] = field(default_factory=dict)
    # Vendors whose every storage interface is switched (Huawei's generic udev rule).
    storage_vendors: frozenset[int] = frozenset()
    sources: tuple[str, ...] = ()

    def storage_ids_of(self, switched: Id) -> tuple[Id, ...]:
        return tuple(sorted(k for k, v in self.switches_to.items() if switched in v))


@frozen
class ClassSnapshot:
    """What the per-class decisions (usb_classes.py) read of a target, read once."""

    net: NetScan
    inputs: InputScan
    switch_db: SwitchDb | None = None
