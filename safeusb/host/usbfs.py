"""What a path or a descriptor handed to QEMU's usb-host names on this host: a USB device
node (usbfs, character major 189), told the way QEMU opens it."""

from __future__ import annotations

import os
import re
import stat

from safeusb.values import frozen

USB_DEVICE_MAJOR = 189
# QEMU's qemu_open() reads a path with this prefix as an fd set number, never as a file.
FDSET_PREFIX = "/dev/fdset/"
MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP after 40)
_DEV_BUS_USB = re.compile(r"/dev/bus/usb/([0-9]{3})/([0-9]{3})")


@frozen
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
    """What this process's descriptor ``fd`` refers to."""
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


def usbfs_busdev(path: str) -> tuple[int, int] | None:
    """Bus and device number of a usbfs node's own name (/dev/bus/usb/BBB/DDD), or None."""
    m = _DEV_BUS_USB.fullmatch(path)
    return (int(m.group(1)), int(m.group(2))) if m else None


def through_proc(path: str) -> bool:
    """Whether the path, its symlinks followed, passes through /proc (where "self" is
    whoever looks: QEMU and the gate would see different files). Unsure counts as yes."""
    todo = path.split("/")
    cur = "/"
    links = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, part)
        if nxt == "/proc" or nxt.startswith("/proc/"):
            return True
        try:
            target = os.readlink(nxt)
        except OSError:
            cur = nxt
            continue
        links += 1
        if links > MAX_SYMLINKS:
            return True
        if target.startswith("/"):
            cur = "/"
        todo = target.split("/") + todo
    return False
