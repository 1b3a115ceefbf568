"""The libvirt QEMU hook, behind the shell drop-in safeusb/libvirt_hook.in.

    python -I -m safeusb.hook DOMAIN OPERATION SUB-OPERATION EXTRA  < domain XML

prepare begin: prepare every USB host device of the domain under the policy (the policy
file, overridden by the domain's <safeusb:policy> metadata); on refusal print one line per
reason and exit 3, which the drop-in turns into libvirt's failure. release end: give back
what this domain took. reconnect, migrate, restore and everything else: exit 0 (migrate
and restore pass the XML through, in the drop-in). A domain without USB host devices is
never refused.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from safeusb.domain import DomainInfo, policy_for_domain
from safeusb.errors import NoSuchDevice, SafeUSBError, XMLError
from safeusb.handover.policy import DEFAULT_PATH
from safeusb.handover.service import Handover
from safeusb.host.journal import DEFAULT_DIR
from safeusb.host.logsetup import setup_logging
from safeusb.host.model import Target
from safeusb.host.roots import Roots
from safeusb.host.selector import Selector, resolve

EXIT_REFUSED = 3
MAX_DOMAIN_XML_BYTES = 64 * 1024 * 1024
log = logging.getLogger("safeusb")

# The drop-in's test, byte for byte: the way libvirt formats a USB host device.
_USB_HOSTDEV = (b"<hostdev mode='subsystem' type='usb'", b'<hostdev mode="subsystem" type="usb"')


def looks_usb(xml: bytes) -> bool:
    """Whether the drop-in sees a USB host device in the XML (and so runs the hook)."""
    return any(pattern in xml for pattern in _USB_HOSTDEV)


def _refuse(lines: Sequence[str]) -> int:
    for line in lines:
        print(f"safeusb: {line}", file=sys.stderr)
    return EXIT_REFUSED


def _report(lines: Sequence[str]) -> None:
    """Lines nobody may miss although the hook succeeds: to stderr and to syslog."""
    for line in lines:
        log.error("%s", line)


def handle(argv: Sequence[str], xml: bytes, roots: Roots, policy_path: str = DEFAULT_PATH,
           state_dir: str = DEFAULT_DIR) -> int:
    """One call of libvirt's hook (DOMAIN OPERATION SUB-OPERATION ...): the exit status
    libvirt acts on."""
    if len(argv) < 3:
        print("safeusb: hook needs DOMAIN OPERATION SUB-OPERATION", file=sys.stderr)
        return 0
    domain, op, subop = argv[0], argv[1], argv[2]
    handover = Handover.from_paths(roots, policy_path, state_dir)
    if (op, subop) == ("release", "end"):
        _release(handover, domain)
        return 0
    if (op, subop) != ("prepare", "begin"):
        return 0
    try:
        info = DomainInfo.from_xml(xml, f"domain {domain}", MAX_DOMAIN_XML_BYTES)
    except XMLError as exc:
        if looks_usb(xml):
            return _refuse([f"{exc}; cannot tell which USB devices it uses, so it is not "
                            "started"])
        return 0
    if not info.hostdevs:
        return 0
    try:
        policy = policy_for_domain(handover.policy(), info)
    except SafeUSBError as exc:
        return _refuse([f"{exc}; refusing to start domain {domain} with USB host devices"])
    refusals: list[str] = []
    targets: list[Target] = []
    for hostdev in info.hostdevs:
        try:
            targets.append(resolve(Selector.from_hostdev(hostdev, f"domain {domain}"), roots))
        except NoSuchDevice as exc:
            # libvirt finds no such device either: it fails the start, or drops the device
            # when its startupPolicy allows. Nothing of the host is at stake.
            log.warning("domain %s: %s is not on the host (%s); left to libvirt",
                        domain, hostdev.describe(), exc)
        except SafeUSBError as exc:
            refusals.append(f"{hostdev.describe()}: {exc}")
    taken = handover.prepare_all(targets, domain, policy)
    refusals.extend(taken.refusals)
    if refusals:
        if taken.targets:
            back = handover.release_domain(domain, policy)
            refusals.extend(f"could not give back: {n}" for n in back.not_undone)
        return _refuse(refusals)
    return 0


def _release(handover: Handover, domain: str) -> None:
    """Give back what the records say the domain took, whatever its XML says now and
    whether or not the policy can be read; report every record not acted on."""
    policy = handover.policy_for_release(
        lambda text: _report([f"release of domain {domain}: {text}"]))
    outcome = handover.release_domain(domain, policy)
    _report([f"release of domain {domain}: {line}" for line in outcome.not_undone])


def main() -> int:
    # libvirt shows the hook's stderr to the user: only reasons and warnings go there.
    setup_logging(logging.WARNING, True, "safeusb-hook")
    xml = sys.stdin.buffer.read()  # whole: what the drop-in tested, so both agree
    usb = looks_usb(xml)
    preparing = sys.argv[2:4] == ["prepare", "begin"]
    try:
        return handle(sys.argv[1:], xml, Roots.host())
    except SafeUSBError as exc:
        if usb and preparing:
            return _refuse([str(exc)])
        _report([str(exc)])
        return 0
    except Exception as exc:  # fail closed, with the reason, for USB domains
        text = f"internal error: {exc.__class__.__name__}: {exc}"
        if usb and preparing:
            return _refuse([text])
        _report([text])
        return 0


if __name__ == "__main__":
    sys.exit(main())
