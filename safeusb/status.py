"""`safeusb status`: every USB device on the host, what uses it, and which domains want it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import sysfs
from .domain import DomainInfo
from .errors import SafeUSBError
from .inspect import Findings, Reason, human_bytes, inspect
from .model import Target, UsbDevice
from .roots import Roots
from .run import Runner
from .snapshot import read_snapshot

CLASSES = {
    0x01: "audio", 0x02: "communications", 0x03: "HID", 0x05: "physical", 0x06: "image",
    0x07: "printer", 0x08: "mass storage", 0x09: "hub", 0x0A: "CDC data",
    0x0B: "smart card", 0x0D: "content security", 0x0E: "video", 0x0F: "healthcare",
    0x10: "audio/video", 0x11: "billboard", 0xDC: "diagnostic", 0xE0: "wireless",
    0xEF: "miscellaneous", 0xFE: "application specific", 0xFF: "vendor specific",
}


def class_names(usb: UsbDevice) -> list[str]:
    classes = [usb.device_class] if usb.device_class not in (0, 0xEF) else []
    classes += [i.interface_class for i in usb.interfaces]
    out: list[str] = []
    for c in classes:
        name = CLASSES.get(c, f"class {c:#04x}")
        if name not in out:
            out.append(name)
    return out


def _short(r: Reason) -> str:
    d = r.details
    if r.kind == "mount":
        return f"mounted at {d.get('mountpoint')}"
    if r.kind == "dirty":
        return f"{human_bytes(int(d.get('dirty_bytes') or 0))} dirty"
    if r.kind == "open":
        return f"held by pid {d.get('pid')} ({d.get('comm')})"
    if r.kind == "swap":
        return "active swap"
    if r.kind == "holder":
        return f"{d.get('holder_kind')} {d.get('holder')} on it"
    if r.kind == "unreadable":
        return "not provably free (something could not be read)"
    return r.text


def summary(f: Findings) -> str:
    if f.free:
        return "free"
    parts: list[str] = []
    for r in f.reasons:
        s = _short(r)
        if s not in parts:
            parts.append(s)
    more = f" (+{len(parts) - 3} more)" if len(parts) > 3 else ""
    return ", ".join(parts[:3]) + more


@dataclass(frozen=True)
class DeviceStatus:
    usb: UsbDevice
    hub: bool
    findings: Findings | None
    domains: tuple[tuple[str, str], ...]

    @property
    def depth(self) -> int:
        return self.usb.sysname.count(".") + (0 if self.usb.sysname.startswith("usb") else 1)

    def as_json(self) -> dict[str, Any]:
        u = self.usb
        return {
            "sysname": u.sysname, "busnum": u.busnum, "devnum": u.devnum,
            "vendor_id": f"{u.vendor_id:04x}", "product_id": f"{u.product_id:04x}",
            "manufacturer": u.manufacturer, "product": u.product, "serial": u.serial,
            "classes": class_names(u),
            "drivers": sorted({i.driver for i in u.interfaces if i.driver}),
            "hub": self.hub,
            "safe_to_hand_over": None if self.findings is None else self.findings.free,
            "uses": None if self.findings is None else summary(self.findings),
            "reasons": [] if self.findings is None else [r.as_json()
                                                         for r in self.findings.reasons],
            "domains": [{"name": n, "state": s} for n, s in self.domains],
        }


@dataclass(frozen=True)
class Status:
    usb_present: bool
    devices: tuple[DeviceStatus, ...]
    libvirt: str  # "connected to URI", or why not
    guard: dict[str, Any] | None = None  # guard.report(), on the host only

    def as_json(self) -> dict[str, Any]:
        out = {"schema_version": 1, "usb": self.usb_present, "libvirt": self.libvirt,
               "devices": [d.as_json() for d in self.devices]}
        if self.guard is not None:
            out["guard"] = self.guard
        return out

    def _guard_text(self) -> str:
        from .guard import as_text  # noqa: PLC0415

        return as_text(self.guard) if self.guard is not None else ""

    def as_text(self) -> str:
        if not self.usb_present:
            return ("This host has no USB subsystem (/sys/bus/usb is missing): "
                    "no USB devices to show.\n") + self._guard_text()
        lines = []
        for d in self.devices:
            u = d.usb
            indent = "  " * d.depth
            name = " ".join(p for p in (u.manufacturer, u.product) if p) or "?"
            drivers = ", ".join(sorted({i.driver for i in u.interfaces if i.driver})) or "-"
            head = (f"{indent}{u.sysname:<10} {u.vid_pid} {name} "
                    f"[{', '.join(class_names(u)) or '-'}; {drivers}]")
            if d.findings is not None:
                verdict = ("safe to hand over" if d.findings.free
                           else "NOT safe: " + summary(d.findings))
                head += f": {verdict}"
            lines.append(head)
            if d.domains:
                lines.append(f"{indent}  wanted by: " + ", ".join(f"{n} ({s})"
                                                                  for n, s in d.domains))
        lines.append(f"libvirt: {self.libvirt}")
        return "\n".join(lines) + "\n" + self._guard_text()


def _domains(uri: str | None) -> tuple[list[tuple[str, str, DomainInfo]], str]:
    try:
        import libvirt  # noqa: PLC0415
    except ImportError:
        return [], "libvirt-python is not installed: domains not shown"
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        return [], f"not reachable ({exc.get_error_message()}): domains not shown"
    out = []
    try:
        for dom in conn.listAllDomains(0):
            state = "running" if dom.isActive() else "defined"
            try:
                info = DomainInfo.from_xml(dom.XMLDesc(0).encode(), dom.name())
            except SafeUSBError:
                continue
            out.append((dom.name(), state, info))
        uri_text = conn.getURI()
    finally:
        conn.close()
    return out, f"connected to {uri_text}"


def _wants(info: DomainInfo, usb: UsbDevice) -> bool:
    for h in info.hostdevs:
        if h.vendor_id is not None and (h.vendor_id, h.product_id) != (usb.vendor_id,
                                                                         usb.product_id):
            continue
        if h.bus is not None and (h.bus, h.device) != (usb.busnum, usb.devnum):
            continue
        return True
    return False


def collect(roots: Roots, uri: str | None = None,
            guard: dict[str, Any] | None = None) -> Status:
    if not os.path.isdir(roots.sys_path("bus", "usb")):
        return Status(False, (), "not asked (no USB)", guard)
    domains, libvirt_state = _domains(uri)
    runner = Runner.for_roots(roots)
    devices = []
    for usb in sorted(sysfs.list_usb_devices(roots),
                      key=lambda u: (u.busnum, not u.sysname.startswith("usb"), u.sysname)):
        hub = usb.device_class == 9 or usb.sysname.startswith("usb")
        findings = None if hub else inspect(read_snapshot(roots, Target(usb.syspath, usb),
                                                          runner))
        wanted = tuple((n, s) for n, s, info in domains if _wants(info, usb))
        devices.append(DeviceStatus(usb, hub, findings, wanted))
    return Status(True, tuple(devices), libvirt_state, guard)
