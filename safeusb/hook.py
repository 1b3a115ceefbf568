"""The libvirt QEMU hook, behind the shell drop-in libvirt_hooks/safeusb.in.

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

from .act import prepare, release_domain, target_key
from .domain import DomainInfo, policy_for_domain
from .errors import NoSuchDevice, SafeUSBError, XMLError
from .hostdev import MAX_XML_BYTES
from .policy import DEFAULT_PATH, Policy
from .roots import Roots
from .run import Runner, setup_logging
from .selector import Selector, resolve
from .state import DEFAULT_DIR, StateDir

EXIT_REFUSED = 3
log = logging.getLogger("safeusb")


def _looks_usb(xml: bytes) -> bool:
    return (b"<hostdev mode='subsystem' type='usb'" in xml
            or b'<hostdev mode="subsystem" type="usb"' in xml)


def _refuse(lines: Sequence[str]) -> int:
    for line in lines:
        print(f"safeusb: {line}", file=sys.stderr)
    return EXIT_REFUSED


def hook(argv: Sequence[str], xml: bytes, roots: Roots, policy_path: str = DEFAULT_PATH,
         state_dir: str = DEFAULT_DIR) -> int:
    if len(argv) < 3:
        print("safeusb: hook needs DOMAIN OPERATION SUB-OPERATION", file=sys.stderr)
        return 0
    domain, op, subop = argv[0], argv[1], argv[2]
    if (op, subop) not in (("prepare", "begin"), ("release", "end")):
        return 0
    looks_usb = _looks_usb(xml)
    try:
        info = DomainInfo.from_xml(xml[: MAX_XML_BYTES + 1], f"domain {domain}")
    except XMLError as exc:
        if op == "prepare" and looks_usb:
            return _refuse([f"{exc}; cannot tell which USB devices it uses"])
        return 0
    if not info.hostdevs:
        return 0
    state = StateDir(state_dir)
    if op == "release":
        outcome = release_domain(roots, domain, Policy.from_file(policy_path),
                                 Runner.for_roots(roots), state)
        for line in outcome.not_undone:
            print(f"safeusb: release of domain {domain}: {line}", file=sys.stderr)
        return 0
    try:
        policy = policy_for_domain(Policy.from_file(policy_path), info)
    except SafeUSBError as exc:
        return _refuse([f"{exc}; refusing to start domain {domain} with USB host devices"])
    refusals: list[str] = []
    taken: list[str] = []
    for hostdev in info.hostdevs:
        try:
            target = resolve(Selector.from_hostdev(hostdev, f"domain {domain}"), roots)
        except NoSuchDevice:
            continue  # libvirt itself reports a missing mandatory device, or drops it
        except SafeUSBError as exc:
            refusals.append(f"{hostdev.describe()}: {exc}")
            continue
        runner = Runner.for_roots(roots)
        outcome = prepare(roots, target, policy, runner, state, domain=domain)
        if outcome.ok:
            if outcome.done:
                taken.append(target_key(target))
            continue
        head = target.describe()
        refusals.extend(f"{head}: {r}" for r in outcome.why_not())
    if refusals:
        if taken:
            back = release_domain(roots, domain, Policy.from_file(policy_path),
                                  Runner.for_roots(roots), state)
            refusals.extend(f"could not give back: {n}" for n in back.not_undone)
        return _refuse(refusals)
    return 0


def main() -> int:
    # libvirt shows the hook's stderr to the user: only reasons and warnings go there.
    setup_logging(logging.WARNING, True, "safeusb-hook")
    xml = sys.stdin.buffer.read(MAX_XML_BYTES + 1)
    looks_usb = _looks_usb(xml)
    try:
        return hook(sys.argv[1:], xml, Roots.host())
    except SafeUSBError as exc:
        if looks_usb and sys.argv[2:3] == ["prepare"]:
            return _refuse([str(exc)])
        return 0
    except Exception as exc:  # fail closed, with the reason, for USB domains
        if looks_usb and sys.argv[2:3] == ["prepare"]:
            return _refuse([f"internal error: {exc.__class__.__name__}: {exc}"])
        return 0


if __name__ == "__main__":
    sys.exit(main())
