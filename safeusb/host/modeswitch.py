"""Mode-switching devices (usb_modeswitch): a warning, never a refusal.

Many modems and some printers first show up as a storage device (a "driver CD") and are
switched by usb_modeswitch, after which they come back with another product id. A
<hostdev> that matches vendor:product then no longer matches the device."""

from __future__ import annotations

import os
import re
import threading

from safeusb.host.model import Id, Node, SwitchDb, UsbDevice
from safeusb.host.roots import Roots
from safeusb.reasons import ModeSwitchMaybe, ModeSwitchStorage, ModeSwitchSwitched, Reason

# Where distributions ship the switch database: the configuration pack (Debian) or its
# files unpacked (Fedora, Arch), local additions, and the udev rules that trigger it.
CONFIG_DIRS = ("usr/share/usb_modeswitch", "etc/usb_modeswitch.d")
RULES = ("lib/udev/rules.d/40-usb_modeswitch.rules",
         "usr/lib/udev/rules.d/40-usb_modeswitch.rules",
         "etc/udev/rules.d/40-usb_modeswitch.rules")

_NAME = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{4})(:|$)")
_RULE_ID = re.compile(
    r'ATTRS?\{idVendor\}=="([0-9a-fA-F]{4})".*?ATTRS?\{idProduct\}=="([0-9a-fA-F]{4})"'
)
_RULE_VENDOR = re.compile(r'ATTRS?\{idVendor\}=="([0-9a-fA-F]{4})"')
_TARGET_VENDOR = re.compile(r"^\s*TargetVendor\s*=\s*(?:0x)?([0-9a-fA-F]{1,4})", re.M)
_TARGET_PRODUCT = re.compile(r'^\s*TargetProduct(?:List)?\s*=\s*"?([0-9a-fA-Fx, ]+)"?', re.M)
STORAGE_CLASS = 0x08


def fmt_id(i: Id) -> str:
    return f"{i[0]:04x}:{i[1]:04x}"


def parse_config(text: str, initial: Id) -> tuple[Id, ...]:
    """Target ids named in one usb_modeswitch configuration file."""
    vendor_m = _TARGET_VENDOR.search(text)
    vendor = int(vendor_m.group(1), 16) if vendor_m else initial[0]
    out = []
    for m in _TARGET_PRODUCT.finditer(text):
        for raw in m.group(1).split(","):
            item = raw.strip().lower().removeprefix("0x")
            if item:
                try:
                    out.append((vendor, int(item, 16)))
                except ValueError:
                    continue
    return tuple(sorted(set(out)))


def _add(db: dict[Id, set[Id]], name: str, text: str) -> None:
    m = _NAME.match(name)
    if m:
        initial = (int(m.group(1), 16), int(m.group(2), 16))
        db.setdefault(initial, set()).update(parse_config(text, initial))


Signature = tuple[tuple[str, int, int, int], ...]


def _signature(root: str) -> Signature:
    """Identity of every file the database is read from (name, inode, size, mtime):
    equal signatures, equal database."""
    paths = [os.path.join(root, rel) for rel in RULES]
    for rel in CONFIG_DIRS:
        d = os.path.join(root, rel)
        paths.append(d)
        try:
            paths += [os.path.join(d, n) for n in sorted(os.listdir(d))]
        except OSError:
            continue
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class SwitchDbCache:
    """The database read once and again only when one of its files changed: unpacking
    Debian's configuration pack costs more than the rest of an inspection (a service
    asked for many decisions keeps one of these)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[Signature, SwitchDb | None]] = {}

    def get(self, root: str = "/") -> SwitchDb | None:
        sig = _signature(root)
        with self._lock:
            kept = self._kept.get(root)
        if kept is not None and kept[0] == sig:
            return kept[1]
        db = read_switch_db(root)
        if _signature(root) == sig:  # not changed while it was read
            with self._lock:
                self._kept[root] = (sig, db)
        return db


def switch_db(roots: Roots, root: str = "/") -> SwitchDb | None:
    """The database as it is now, kept in ``roots`` (Roots.kept) between reads: read again
    only when one of its files changed."""
    cache = roots.kept.get("modeswitch")
    if cache is None:
        cache = roots.kept.setdefault("modeswitch", SwitchDbCache())  # one wins a race
    db: SwitchDb | None = cache.get(root)
    return db


def read_switch_db(root: str = "/") -> SwitchDb | None:
    """The switch database as the distribution ships it; None when it is not installed."""
    db: dict[Id, set[Id]] = {}
    vendors: set[int] = set()
    sources = []
    for rel in CONFIG_DIRS:
        d = os.path.join(root, rel)
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            path = os.path.join(d, name)
            if name.endswith(".tar.gz"):
                import tarfile  # noqa: PLC0415 (only where the distribution ships its pack)

                try:
                    with tarfile.open(path, "r:gz") as tar:
                        for member in tar.getmembers():
                            f = tar.extractfile(member) if member.isfile() else None
                            if f is not None:
                                _add(db, os.path.basename(member.name),
                                     f.read(65536).decode("utf-8", "replace"))
                except (OSError, tarfile.TarError):
                    continue
                sources.append(path)
            elif _NAME.match(name):
                try:
                    with open(path, encoding="utf-8", errors="replace") as fh:
                        _add(db, name, fh.read(65536))
                except OSError:
                    continue
                if d not in sources:
                    sources.append(d)
    for rel in RULES:
        path = os.path.join(root, rel)
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
        except OSError:
            continue
        sources.append(path)
        for line in lines:
            if line.lstrip().startswith("#") or "usb_modeswitch" not in line:
                continue
            m = _RULE_ID.search(line)
            if m:
                db.setdefault((int(m.group(1), 16), int(m.group(2), 16)), set())
            elif 'bInterfaceClass}=="08"' in line and (v := _RULE_VENDOR.search(line)):
                vendors.add(int(v.group(1), 16))
    if not sources:
        return None
    return SwitchDb({k: tuple(sorted(v)) for k, v in db.items()}, frozenset(vendors),
                    tuple(sources))


def modeswitch_warnings(
    usb: UsbDevice, nodes: tuple[Node, ...], db: SwitchDb | None
) -> list[Reason]:
    """A warning (never a refusal) for a device that changes its vendor:product."""
    ident = (usb.vendor_id, usb.product_id)
    storage_only = bool(usb.interfaces) and all(
        i.interface_class == STORAGE_CLASS for i in usb.interfaces)
    advice = (f"select it by bus and device address instead (bus {usb.busnum} device "
              f"{usb.devnum}), and inspect it again once it has switched")
    vendor, product = f"{usb.vendor_id:04x}", f"{usb.product_id:04x}"
    if db is not None:
        targets = db.switches_to.get(ident)
        generic = (usb.vendor_id in db.storage_vendors
                   and any(i.interface_class == STORAGE_CLASS for i in usb.interfaces)
                   and (usb.manufacturer or "") != "Android")
        if targets is not None or generic:
            becomes = ", ".join(fmt_id(t) for t in targets or ()) or "another product id"
            return [Reason(
                f"{usb.vid_pid} is a mode-switching device in its storage (\"driver CD\") "
                f"mode: usb_modeswitch turns it into {becomes}, and a <hostdev> matching "
                f"vendor:product {usb.vid_pid} will not follow the switch; {advice}",
                ModeSwitchStorage(vendor, product, tuple(fmt_id(t) for t in targets or ()),
                                  db.sources))]
        before = db.storage_ids_of(ident)
        if before:
            was = ", ".join(fmt_id(b) for b in before)
            return [Reason(
                f"{usb.vid_pid} is a mode-switching device already switched (its storage "
                f"mode is {was}): after a reset or replug it comes back as {was}, and a "
                f"<hostdev> matching vendor:product {usb.vid_pid} will not follow it; "
                f"{advice}",
                ModeSwitchSwitched(vendor, product, tuple(fmt_id(b) for b in before),
                                   db.sources))]
        return []
    if storage_only and any(n.devname.startswith("sr") for n in nodes if n.kind == "block"):
        return [Reason(
            f"{usb.vid_pid} presents only a CD-ROM drive, as a modem in its \"driver CD\" "
            f"mode does, and the usb_modeswitch database is not installed to tell: if it "
            f"switches, a <hostdev> matching vendor:product {usb.vid_pid} will not follow "
            f"it; {advice}",
            ModeSwitchMaybe(vendor, product))]
    return []
