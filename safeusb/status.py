"""`safeusb status`: every USB device on the host, what uses it, and which domains want it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from safeusb.errors import SafeUSBError
from safeusb.host import defaults, sysfs
from safeusb.host.model import Target, UsbDevice
from safeusb.host.roots import SYS, Roots
from safeusb.inspect.decide import Findings
from safeusb.reasons import (
    Dirty,
    Holder,
    LoopHolder,
    Mount,
    Open,
    Reason,
    ReasonKind,
    reason_from_json,
)
from safeusb.textout import human_bytes
from safeusb.values import frozen

if TYPE_CHECKING:
    from safeusb.domain import DomainInfo
    from safeusb.host.runner import Runner

# Asks safeusbd to inspect the device at (bus, address): its JSON answer, or None when it
# gives none (the device is then inspected here).
Asker = Callable[[int, int], "dict[str, Any] | None"]

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
    if isinstance(d, Mount):
        return f"mounted at {d.mountpoint}"
    if isinstance(d, Dirty):
        return f"{human_bytes(d.dirty_bytes)} dirty"
    if isinstance(d, Open):
        return f"held by pid {d.pid} ({d.comm})"
    if r.kind is ReasonKind.SWAP:
        return "active swap"
    if isinstance(d, Holder):
        return f"{d.holder_kind} {d.holder} on it"
    if isinstance(d, LoopHolder):
        return f"loop {d.holder} on it"
    if r.kind is ReasonKind.UNREADABLE:
        return "not provably free (something could not be read)"
    return r.text


@frozen
class Answered:
    """safeusbd's findings for a device, from its inspect answer: what status shows of
    findings (free, and the reasons) and nothing more."""

    reasons: tuple[Reason, ...]

    @property
    def free(self) -> bool:
        return not self.reasons

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Answered:
        """ValueError when the answer is not an inspect object."""
        try:
            reasons = tuple(reason_from_json(r) for r in doc["reasons"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an inspect object: {exc}") from None
        if doc.get("free") is not (not reasons):
            raise ValueError("not an inspect object: wrong types")
        return cls(reasons)


def summary(f: Findings | Answered) -> str:
    if f.free:
        return "free"
    parts: list[str] = []
    for r in f.reasons:
        s = _short(r)
        if s not in parts:
            parts.append(s)
    more = f" (+{len(parts) - 3} more)" if len(parts) > 3 else ""
    return ", ".join(parts[:3]) + more


@frozen
class DeviceStatus:
    usb: UsbDevice
    hub: bool
    findings: Findings | Answered | None
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


@frozen
class AttachRuleStatus:
    """A policy rule with attach_to: its domain, and the devices it matches now."""

    name: str
    matchers: str  # "vendor_product 46f4:0001"
    domain: str
    domain_state: str  # running, defined, not defined, unknown
    devices: tuple[tuple[str, str], ...]  # (port, where it is now)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "matchers": self.matchers, "domain": self.domain,
                "domain_state": self.domain_state,
                "devices": [{"sysname": k, "state": w} for k, w in self.devices]}

    def as_text(self) -> str:
        holds = ", ".join(f"{k} ({w})" for k, w in self.devices) or "nothing"
        return (f"  rule {self.name!r} ({self.matchers}) -> {self.domain} "
                f"({self.domain_state}): holds {holds}")


@frozen
class AttachStatus:
    policy: str  # the file, or why it cannot be used
    udev_rules: str  # "PATH: up to date" ...
    rules: tuple[AttachRuleStatus, ...]
    unusable: bool = False  # the policy cannot be read: policy says why

    def as_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "udev_rules": self.udev_rules,
                "rules": [r.as_json() for r in self.rules], "policy_error": self.unusable}

    def as_text(self) -> str:
        if self.unusable:
            return f"attach_to rules: not shown: {self.policy}\n"
        if not self.rules:
            return ""
        return "\n".join([f"attach_to rules ({self.policy}; udev rules {self.udev_rules}):",
                          *(r.as_text() for r in self.rules)]) + "\n"


@frozen
class Status:
    usb_present: bool
    devices: tuple[DeviceStatus, ...]
    libvirt: str  # "connected to URI", or why not
    unprotected: tuple[str, ...] | None = None  # domains without the gate (None: unknown)
    guard: dict[str, Any] | None = None  # guard.report(), on the host only
    attach: AttachStatus | None = None  # the policy's attach_to rules

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": 1, "usb": self.usb_present, "libvirt": self.libvirt,
            "devices": [d.as_json() for d in self.devices],
            "unprotected_domains": None if self.unprotected is None else list(self.unprotected)}
        if self.guard is not None:
            out["guard"] = self.guard
        if self.attach is not None:
            out["attach_to"] = self.attach.as_json()
        return out

    def protection_line(self) -> str | None:
        if not self.unprotected:
            return None
        return ("domains not protected (live USB hotplug into them is not guarded; "
                "`safeusb protect --all`): " + ", ".join(self.unprotected))

    def _guard_text(self) -> str:
        from safeusb.host.guard import as_text  # noqa: PLC0415

        return as_text(self.guard) if self.guard is not None else ""

    def as_text(self) -> str:
        if not self.usb_present:
            extra = self.protection_line()
            return (f"This host has no USB subsystem ({SYS}/bus/usb is missing): "
                    "no USB devices to show.\n" + (extra + "\n" if extra else "")
                    + self._guard_text())
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
        extra = self.protection_line()
        if extra:
            lines.append(extra)
        lines.append(f"libvirt: {self.libvirt}")
        attach = self.attach.as_text() if self.attach is not None else ""
        return "\n".join(lines) + "\n" + attach + self._guard_text()


def _domains(uri: str | None) -> tuple[list[tuple[str, str, DomainInfo]], str,
                                        tuple[str, ...] | None]:
    """Each domain (name, state, USB devices), libvirt's state in words, and the domains
    whose definition does not run the gate."""
    from safeusb.domain import DomainInfo  # noqa: PLC0415 (lxml and the policy code, only here)
    from safeusb.host.virt import Connection, VirtError, VirtMissing  # noqa: PLC0415
    from safeusb.hostdev import parse_xml  # noqa: PLC0415
    from safeusb.protect import is_protected  # noqa: PLC0415

    out = []
    unprotected: list[str] = []
    try:
        with Connection.open(uri, read_only=True) as conn:
            uri_text = conn.uri()
            for dom in conn.domains():
                try:  # a domain that cannot be read (or went away) is left out
                    name = dom.name
                    state = "running" if dom.active() else "defined"
                    xml = dom.xml()
                    info = DomainInfo.from_xml(xml, name)
                    if dom.persistent():
                        xml = dom.xml(inactive=True)
                    if not is_protected(parse_xml(xml, name), name):
                        unprotected.append(name)
                except SafeUSBError:
                    continue
                out.append((name, state, info))
    except VirtMissing:
        return [], "libvirt-python is not installed: domains not shown", None
    except VirtError as exc:
        return [], f"not reachable ({exc}): domains not shown", None
    return out, f"connected to {uri_text}", tuple(sorted(unprotected))


def _wants(info: DomainInfo, usb: UsbDevice) -> bool:
    for h in info.hostdevs:
        if h.vendor_id is not None and (h.vendor_id, h.product_id) != (usb.vendor_id,
                                                                         usb.product_id):
            continue
        if h.bus is not None and (h.bus, h.device) != (usb.busnum, usb.devnum):
            continue
        return True
    return False


def _matchers(rule: Any) -> str:
    parts = []
    for key in ("vendor_product", "serial", "port"):
        values = getattr(rule, key)
        if values:
            parts.append(f"{key} {', '.join(values)}")
    if rule.usb_class:
        parts.append("usb_class " + ", ".join(str(c) for c in rule.usb_class))
    return "; ".join(parts)


def attach_status(roots: Roots, policy_path: str, state_dir: str,
                  domain_states: dict[str, str] | None,
                  devices: list[UsbDevice]) -> AttachStatus | None:
    """The policy's attach_to rules, their domains and the devices each matches now (a
    device counts for the first rule it matches, as safeusbd decides), with where each is:
    handed to a domain (safeusb's record) or on the host."""
    from safeusb import udevrules  # noqa: PLC0415
    from safeusb.handover.policy import Policy  # noqa: PLC0415
    from safeusb.host.journal import StateDir, StateError  # noqa: PLC0415

    try:
        policy = Policy.from_file(policy_path)
    except SafeUSBError as exc:
        return AttachStatus(f"{exc}", "not checked", (), unusable=True)
    if not policy.attach_rules:
        return None
    udev = f"{udevrules.rules_path()}: {udevrules.installed_state(policy)}"
    state = StateDir(state_dir)
    held: dict[str, list[tuple[str, str]]] = {r.name: [] for r in policy.attach_rules}
    for usb in devices:
        rule = policy.attach_rule_for(usb)
        if rule is None:
            continue
        try:
            record = state.load(usb.sysname)
        except (StateError, OSError) as exc:
            where = f"record not readable: {exc}"
        else:
            if record is None:
                where = "on the host"
            elif record.domain:
                where = f"handed to {record.domain}"
            else:
                where = "taken by safeusb prepare"
        held[rule.name].append((usb.sysname, where))
    rules = []
    for rule in policy.attach_rules:
        assert rule.attach_to is not None
        if domain_states is None:
            dstate = "unknown"
        else:
            dstate = domain_states.get(rule.attach_to, "not defined")
        rules.append(AttachRuleStatus(rule.name, _matchers(rule), rule.attach_to, dstate,
                                      tuple(held[rule.name])))
    return AttachStatus(f"policy {policy_path}", udev, tuple(rules))


def collect(roots: Roots, uri: str | None = None, guard: dict[str, Any] | None = None, *,
            ask: Asker | None = None, policy_path: str | None = None,
            state_dir: str | None = None) -> Status:
    """Every USB device; each one that is not a hub inspected by safeusbd through ``ask``
    when it answers, else here. With ``policy_path``, the policy's attach_to rules too."""
    if not sysfs.has_usb(roots):
        return Status(False, (), "not asked (no USB)", None, guard)
    domains, libvirt_state, unprotected = _domains(uri)
    runner: Runner | None = None
    devices = []
    for usb in sorted(sysfs.list_usb_devices(roots),
                      key=lambda u: (u.busnum, not u.sysname.startswith("usb"), u.sysname)):
        hub = usb.device_class == 9 or usb.sysname.startswith("usb")
        findings: Findings | Answered | None = None
        if not hub and ask is not None:
            answer = ask(usb.busnum, usb.devnum)
            if answer is not None:
                try:
                    findings = Answered.from_json(answer)
                except ValueError:
                    findings = None
        if not hub and findings is None:
            from safeusb.host.runner import Runner  # noqa: PLC0415
            from safeusb.host.snapshot import read_snapshot  # noqa: PLC0415
            from safeusb.inspect.decide import inspect  # noqa: PLC0415

            if runner is None:
                runner = Runner.for_roots(roots)
                runner.ensure_debugfs(roots)
            findings = inspect(read_snapshot(roots, Target(usb.syspath, usb)))
        wanted = tuple((n, s) for n, s, info in domains if _wants(info, usb))
        devices.append(DeviceStatus(usb, hub, findings, wanted))
    attach = None
    if policy_path is not None:
        states = None if unprotected is None else {n: s for n, s, _ in domains}
        attach = attach_status(roots, policy_path, state_dir or defaults.STATE_DIR, states,
                               [d.usb for d in devices if not d.hub])
    return Status(True, tuple(devices), libvirt_state, unprotected, guard, attach)
