"""Build small sysfs/procfs/debugfs trees, laid out as the kernel does, for pure tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from safeusb.host.roots import Roots

PCI = "devices/pci0000:00/0000:00:04.0"
LINUX_NS = 4026531840


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


@dataclass
class FakeSystem:
    root: Path
    pids: dict[int, int] = field(default_factory=dict)  # pid -> mount namespace

    def __post_init__(self) -> None:
        for d in ("sys/class/block", "sys/bus/usb/devices", "sys/dev/block", "sys/dev/char",
                  "proc", "debug/bdi"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        _write(self.root / "proc/swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")

    @property
    def roots(self) -> Roots:
        return Roots.from_recording(str(self.root))

    @property
    def sys(self) -> Path:
        return self.root / "sys"

    def usb_device(self, sysname: str, vid: int, pid: int, busnum: int, devnum: int,
                   serial: str = "STICK1", iface_class: int = 8) -> Path:
        bus = self.sys / PCI / f"usb{busnum}"
        if not bus.exists():
            self._usb_dir(bus, 0x1D6B, 3, busnum, 1, f"usb{busnum}", dev_class=9)
        path = bus / sysname
        self._usb_dir(path, vid, pid, busnum, devnum, sysname)
        _write(path / "serial", serial + "\n")
        _write(path / "product", "QEMU USB HARDDRIVE\n")
        _write(path / "manufacturer", "QEMU\n")
        iface = path / f"{sysname}:1.0"
        _write(iface / "bInterfaceClass", f"{iface_class:02x}\n")
        _link(iface / "driver", self.sys / "bus/usb/drivers/usb-storage")
        _link(self.sys / "bus/usb/devices" / iface.name, iface)
        return path

    def _usb_dir(self, path: Path, vid: int, pid: int, busnum: int, devnum: int,
                 sysname: str, dev_class: int = 0) -> None:
        for name, value in (("idVendor", f"{vid:04x}"), ("idProduct", f"{pid:04x}"),
                            ("busnum", str(busnum)), ("devnum", str(devnum)),
                            ("bDeviceClass", f"{dev_class:02x}")):
            _write(path / name, value + "\n")
        major, minor = 189, (busnum - 1) * 128 + devnum - 1
        self._node(path, "usb", f"bus/usb/{busnum:03d}/{devnum:03d}", major, minor, "char",
                   "usb_device")
        _link(self.sys / "bus/usb/devices" / sysname, path)

    def _node(self, path: Path, subsystem: str, devname: str, major: int, minor: int,
              kind: str, devtype: str) -> None:
        _write(path / "dev", f"{major}:{minor}\n")
        _write(path / "uevent", f"MAJOR={major}\nMINOR={minor}\nDEVNAME={devname}\n"
                                f"DEVTYPE={devtype}\n")
        _link(path / "subsystem", self.sys / "class" / subsystem)
        _link(self.sys / "dev" / kind / f"{major}:{minor}", path)

    def disk(self, usb: Path, name: str, major: int, minor: int, size_mib: int = 64) -> Path:
        path = usb / f"{usb.name}:1.0/host0/target0:0:0/0:0:0:0/block" / name
        return self._block(path, name, major, minor, "disk", size_mib)

    def virtual_disk(self, name: str, major: int, minor: int, size_mib: int = 64) -> Path:
        return self._block(self.sys / "devices/virtual/block" / name, name, major, minor,
                           "disk", size_mib)

    def partition(self, disk: Path, name: str, major: int, minor: int, size_mib: int = 32) -> Path:
        path = self._block(disk / name, name, major, minor, "partition", size_mib)
        _write(path / "partition", "1\n")
        (path / "bdi").unlink()
        return path

    def _block(self, path: Path, name: str, major: int, minor: int, devtype: str,
               size_mib: int) -> Path:
        self._node(path, "block", name, major, minor, "block", devtype)
        _write(path / "size", str(size_mib * 2048) + "\n")
        (path / "holders").mkdir(parents=True, exist_ok=True)
        (path / "slaves").mkdir(parents=True, exist_ok=True)
        _link(path / "bdi", self.sys / f"devices/virtual/bdi/{major}:{minor}")
        _link(self.sys / "class/block" / name, path)
        self.bdi(major, minor, 0, 0)
        return path

    def holder(self, below: Path, above: Path) -> None:
        _link(below / "holders" / above.name, above)
        _link(above / "slaves" / below.name, below)

    def dm(self, name: str, minor: int, dm_name: str, uuid: str, below: Path) -> Path:
        path = self.virtual_disk(name, 254, minor)
        _write(path / "dm/name", dm_name + "\n")
        _write(path / "dm/uuid", uuid + "\n")
        self.holder(below, path)
        return path

    def bdi(self, major: int, minor: int, dirty_kib: int, writeback_kib: int) -> None:
        _write(self.root / f"debug/bdi/{major}:{minor}/stats",
               f"BdiWriteback:       {writeback_kib:8d} kB\n"
               f"BdiReclaimable:     {dirty_kib:8d} kB\n"
               f"BdiDirtyThresh:            0 kB\n"
               f"BdiWriteBandwidth:    102400 kBps\n"
               f"b_dirty:                     0\n")

    def process(self, pid: int, comm: str, mnt_ns: int, mountinfo: str) -> None:
        base = self.root / "proc" / str(pid)
        _write(base / "comm", comm + "\n")
        _write(base / "mountinfo", mountinfo)
        (base / "ns").mkdir(parents=True, exist_ok=True)
        (base / "ns/mnt").symlink_to(f"mnt:[{mnt_ns}]")
        (base / "fd").mkdir(exist_ok=True)
        self.pids[pid] = mnt_ns

    def swaps(self, *rows: str) -> None:
        _write(self.root / "proc/swaps",
               "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n" + "".join(rows))


ROOT_MOUNT = "21 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"


def mount_line(mount_id: int, devnum: str, mountpoint: str, source: str,
               fstype: str = "ext4") -> str:
    return f"{mount_id} 21 {devnum} / {mountpoint} rw,nosuid - {fstype} {source} rw\n"
