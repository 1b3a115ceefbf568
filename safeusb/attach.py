"""`safeusb attach-device` / `detach-device`: virsh's commands, guarded.

attach-device prepares every USB host device of the XML under the policy before libvirt
hands it to the running guest, and gives it back if libvirt fails; detach-device gives
the device back to the host after libvirt has taken it from the guest.
"""

from __future__ import annotations

from typing import Any

from safeusb.errors import LibvirtError, Refused, SafeUSBError, XMLError
from safeusb.handover.policy import Policy
from safeusb.handover.service import Handover, refusal_text, release_lines
from safeusb.host import virt
from safeusb.host.model import Target
from safeusb.host.selector import Selector, resolve
from safeusb.host.virt import Connection, Domain, VirtError
from safeusb.hostdev import usb_hostdevs
from safeusb.values import frozen


@frozen
class Flags:
    live: bool = False
    config: bool = False
    current: bool = False
    persistent: bool = False

    def libvirt_flags(self, running: bool) -> int:
        if self.current and (self.live or self.config or self.persistent):
            raise SafeUSBError("--current cannot be combined with --live, --config or "
                               "--persistent")
        flags = 0
        if self.live:
            flags |= virt.AFFECT_LIVE
        if self.config:
            flags |= virt.AFFECT_CONFIG
        if self.persistent:
            flags |= virt.AFFECT_CONFIG
            if running:
                flags |= virt.AFFECT_LIVE
        return flags  # 0 is VIR_DOMAIN_AFFECT_CURRENT

    def affects_live(self, running: bool) -> bool:
        return running and (self.live or self.persistent or not (self.config or self.live))


def _domain(uri: str | None, name: str) -> Domain:
    try:
        return Connection.open(uri).domain(name)
    except VirtError as exc:
        raise LibvirtError(f"libvirt: {exc}") from None


def attach(handover: Handover, uri: str | None, name: str, xml: bytes, source: str,
           flags: Flags, policy: Policy) -> list[str]:
    dom = _domain(uri, name)
    running = _active(dom)
    hostdevs = _hostdevs(xml, source)
    taken: list[Target] = []
    lines = []
    if flags.affects_live(running):
        for hd in hostdevs:
            target = resolve(Selector.from_hostdev(hd, source), handover.roots)
            outcome = handover.prepare(target, name, policy=policy)
            if not outcome.ok:
                handover.give_back(taken, name, policy)
                raise Refused(refusal_text(target.describe(), outcome))
            taken.append(target)
            lines.extend(outcome.done)
    try:
        dom.attach(xml.decode(), flags.libvirt_flags(running))
    except VirtError as exc:
        handover.give_back(taken, name, policy)
        raise LibvirtError(f"libvirt: {exc}") from None
    return [*lines, "Device attached successfully"]


def detach(handover: Handover, uri: str | None, name: str, xml: bytes, source: str,
           flags: Flags, policy: Policy | None) -> list[str]:
    dom = _domain(uri, name)
    running = _active(dom)
    hostdevs = _hostdevs(xml, source)
    try:
        dom.detach(xml.decode(), flags.libvirt_flags(running))
    except VirtError as exc:
        raise LibvirtError(f"libvirt: {exc}") from None
    lines = ["Device detached successfully"]
    if flags.affects_live(running):
        for hd in hostdevs:
            try:
                target = resolve(Selector.from_hostdev(hd, source), handover.roots)
            except SafeUSBError as exc:
                lines.append(f"not given back: {exc}")
                continue
            lines.extend(release_lines(handover.release_target(target, name, policy)))
    return lines


def _active(dom: Domain) -> bool:
    try:
        return dom.active()
    except VirtError as exc:
        raise LibvirtError(f"libvirt: {exc}") from None


def _hostdevs(xml: bytes, source: str) -> tuple[Any, ...]:
    try:
        return usb_hostdevs(xml, source)
    except XMLError:
        if b"<hostdev" in xml:
            raise
        return ()  # not a host device: libvirt alone decides
