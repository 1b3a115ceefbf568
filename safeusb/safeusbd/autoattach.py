"""safeusbd hands a device to the domain a policy rule names (``attach_to``) when it is
plugged in.

The host never takes such a device: the udev rules generated from the same policy
(``safeusb install-udev-rules``, safeusb.udevrules) mark its block devices before any
consumer sees them, so udisks and systemd leave them alone. safeusbd then decides, for
each USB device that arrives (a uevent ``add``), by the policy read at that moment:

- **no rule with attach_to matches**: nothing is done; the device is the host's as before;
- **its domain runs**: the device is prepared for the domain exactly as ``safeusb
  prepare --domain`` does (same policy, same record under /run/safeusb; a refusal leaves
  it on the host and is logged with the reasons), then attached through libvirt
  (``attachDeviceFlags``, live, a ``<hostdev>`` by bus and device number). When libvirt
  refuses, the device is given back at once;
- **its domain does not run** (or libvirt cannot say): the device stays on the host,
  marked, and waits.

When libvirt says a domain started, every device on the host that a rule hands to it and
that is not taken already (no record) is prepared and attached, as VirtualBox's filters
take the devices present when a machine starts: those that waited, one given back when
the domain stopped, and one present since before the rule was written. A device that
left the running domain (``virsh detach-device``) is given back by the handover watch
(safeusb.safeusbd.events) and is not attached again while the domain keeps running: a detach
stays a detach until the domain's next start, or until the device is plugged in again
(a new arrival). Devices already present when safeusbd starts are decided as if they
arrived then.

A device is decided once its interfaces all have a driver (usb-storage bound: its disk
is being scanned and comes marked), or ``SETTLE_MAX`` seconds after it arrived. A
refused prepare of a device that just arrived is tried again after 1, 2 and 4 seconds
(udev's own probing holds a new disk open for a moment); a refusal changes nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from safeusb.errors import LibvirtError, SafeUSBError
from safeusb.handover.policy import Policy, Rule
from safeusb.host import sysfs, virt
from safeusb.host.roots import Roots
from safeusb.host.sysfs import device_now

log = logging.getLogger("safeusb")

SETTLE_MAX = 5.0  # seconds after an arrival to wait for its interfaces' drivers at most
RETRIES = (1.0, 2.0, 4.0)  # seconds before trying a refused arrival again


class Libvirt(Protocol):
    def active(self, name: str) -> bool | None:
        """Whether the domain runs: True, False (not running, no such domain), None
        (libvirt cannot say)."""
        ...

    def attach(self, name: str, xml: str) -> None:
        """Attach the device live; SafeUSBError with libvirt's words when it fails."""
        ...


class Handover(Protocol):
    def prepare(self, key: str, domain: str) -> tuple[bool, list[str]]:
        """Prepare the device at port ``key`` for the domain: (handed over, what was done
        or why not)."""
        ...

    def give_back(self, key: str, domain: str) -> list[str]:
        """Give the device back to the host by its record; what was done."""
        ...


def hostdev_xml(busnum: int, devnum: int) -> str:
    return (f"<hostdev mode='subsystem' type='usb'><source><address bus='{busnum}' "
            f"device='{devnum}'/></source></hostdev>")


@dataclass
class Arrival:
    since: float
    tries: int = 0
    due: float = 0.0  # not before this (clock) time


@dataclass
class Waiting:
    dev: str  # the usbfs node's device number: this plug-in of the device
    rule: str
    domain: str
    why: str


class AutoAttach:
    """What safeusbd does with devices the policy hands to a domain (see the module's
    docstring). ``added``, ``returned`` and ``domain_started`` may be called from any
    thread; ``scan`` only from the event thread."""

    def __init__(self, roots: Roots, load_policy: Callable[[], Policy], libvirt: Libvirt,
                 handover: Handover, has_record: Callable[[str], bool],
                 clock: Callable[[], float] = time.monotonic,
                 settle_max: float = SETTLE_MAX,
                 retries: tuple[float, ...] = RETRIES) -> None:
        self.roots = roots
        self.load_policy = load_policy
        self.libvirt = libvirt
        self.handover = handover
        self.has_record = has_record
        self.clock = clock
        self.settle_max = settle_max
        self.retries = retries
        self.lock = threading.Lock()
        self.arrivals: dict[str, Arrival] = {}
        self.returns: set[str] = set()
        self.started: set[str] = set()
        self.waiting: dict[str, Waiting] = {}
        self.attached: dict[str, str] = {}  # port -> domain, attached by this service

    # -- from other threads ---------------------------------------------------------------

    def added(self, sys_path: str) -> None:
        """A USB device arrived (uevent add); interfaces (``2-1:1.0``) are not devices."""
        key = os.path.basename(sys_path)
        if ":" in key or not key:
            return
        with self.lock:
            self.arrivals[key] = Arrival(self.clock())

    def returned(self, key: str) -> None:
        """The device was given back to the host (its domain let go)."""
        with self.lock:
            self.returns.add(key)

    def domain_started(self, name: str) -> None:
        with self.lock:
            self.started.add(name)

    def pending(self) -> bool:
        with self.lock:
            return bool(self.arrivals or self.returns or self.started)

    # -- the event thread ---------------------------------------------------------------

    def scan(self) -> bool:
        """Decide what arrived, returned or may go now; True when an arrival is still
        settling (look again soon)."""
        with self.lock:
            arrivals = dict(self.arrivals)
            returns, self.returns = self.returns, set()
            started, self.started = self.started, set()
        again = False
        for key, arrival in sorted(arrivals.items()):
            settled = None if self.clock() < arrival.due else self._settled(key, arrival)
            if settled is None:
                again = True
                continue
            retry = self._arrived(key, arrival) if settled else False
            with self.lock:
                if self.arrivals.get(key) is arrival and not retry:
                    del self.arrivals[key]
            again |= retry
        for key in sorted(returns):
            self._returned(key)
        for name in sorted(started):
            self._started(name)
        return again

    def _settled(self, key: str, arrival: Arrival) -> bool | None:
        """True: decide now; False: it is gone; None: not yet (interfaces still without
        a driver, and it arrived less than settle_max seconds ago)."""
        now = device_now(self.roots, key)
        if now is None:
            return False
        if all(d is not None for d in now.drivers.values()):
            return True
        return True if self.clock() - arrival.since >= self.settle_max else None

    def _match(self, key: str) -> tuple[Rule, Any, str] | None:
        """The attach_to rule the device at ``key`` matches, the device, its node."""
        now = device_now(self.roots, key)
        if now is None:
            return None
        try:
            usb = sysfs.usb_device_at(self.roots, key)
        except SafeUSBError:
            return None
        if usb is None:
            return None
        try:
            policy = self.load_policy()
        except SafeUSBError as exc:
            log.warning("safeusbd: attach_to: %s arrived; the policy cannot be used (%s): "
                        "it stays on the host", key, exc)
            return None
        rule = policy.attach_rule_for(usb)
        if rule is None:
            return None
        return rule, usb, now.dev

    def _arrived(self, key: str, arrival: Arrival) -> bool:
        """Decide an arrival; True to try it again later (a refusal, RETRIES)."""
        found = self._match(key)
        if found is None:
            with self.lock:
                self.waiting.pop(key, None)
                self.attached.pop(key, None)
            return False
        rule, usb, dev = found
        assert rule.attach_to is not None
        domain = rule.attach_to
        if arrival.tries == 0:
            what = f"{key} ({usb.vid_pid}{f' serial {usb.serial}' if usb.serial else ''})"
            log.info("safeusbd: attach_to: %s arrived; rule %r hands it to domain %s", what,
                     rule.name, domain)
        if self.has_record(key):
            log.warning("safeusbd: attach_to: %s is already recorded as taken; left alone",
                        key)
            return False
        active = self.libvirt.active(domain)
        if active is not True:
            why = "not running" if active is False else "libvirt cannot say whether it runs"
            self._wait(key, dev, rule, domain, f"domain {domain} {why}")
            return False
        retry = self.retries[arrival.tries] if arrival.tries < len(self.retries) else None
        if self._attach(key, usb, dev, rule, domain, retry):
            return False
        if retry is None:
            return False
        arrival.tries += 1
        arrival.due = self.clock() + retry
        return True

    def _returned(self, key: str) -> None:
        with self.lock:
            self.attached.pop(key, None)
        found = self._match(key)
        if found is None:
            return
        rule, _usb, dev = found
        assert rule.attach_to is not None
        self._wait(key, dev, rule, rule.attach_to,
                   f"given back by domain {rule.attach_to}")

    def _started(self, name: str) -> None:
        """Every device on the host that a rule hands to ``name`` and that nobody took."""
        with self.lock:
            for key in [k for k, w in self.waiting.items() if w.domain == name]:
                del self.waiting[key]
        try:
            present = sysfs.list_usb_devices(self.roots)
        except (SafeUSBError, OSError) as exc:
            log.warning("safeusbd: attach_to: domain %s started; USB devices cannot be "
                        "listed: %s", name, exc)
            return
        for device in sorted(present, key=lambda u: u.sysname):
            key = device.sysname
            if key.startswith("usb"):
                continue  # a root hub
            found = self._match(key)
            if found is None or found[0].attach_to != name or self.has_record(key):
                continue
            rule, usb, dev = found
            log.info("safeusbd: attach_to: domain %s started; handing it %s", name, key)
            self._attach(key, usb, dev, rule, name)

    def _wait(self, key: str, dev: str, rule: Rule, domain: str, why: str) -> None:
        with self.lock:
            self.waiting[key] = Waiting(dev, rule.name, domain, why)
        log.info("safeusbd: attach_to: %s stays on the host (%s); it goes to domain %s "
                 "when that starts", key, why, domain)

    def _attach(self, key: str, usb: Any, dev: str, rule: Rule, domain: str,
                retry: float | None = None) -> bool:
        """Prepare and attach; False when prepare refused (the device stays on the host;
        with ``retry``, to be tried again in that many seconds)."""
        ok, lines = self.handover.prepare(key, domain)
        if not ok:
            if retry is not None:
                log.info("safeusbd: attach_to: %s not handed to domain %s yet (%s); trying "
                         "again in %g s", key, domain, "; ".join(lines), retry)
                return False
            log.warning("safeusbd: attach_to: %s NOT handed to domain %s, it stays on the "
                        "host: %s", key, domain, "; ".join(lines))
            self._wait(key, dev, rule, domain, "refused: " + "; ".join(lines))
            return False
        for line in lines:
            log.info("safeusbd: attach_to: %s: %s", key, line)
        xml = hostdev_xml(usb.busnum, usb.devnum)
        try:
            self.libvirt.attach(domain, xml)
        except SafeUSBError as exc:
            back = self.handover.give_back(key, domain)
            log.warning("safeusbd: attach_to: libvirt did not attach %s to domain %s (%s); "
                        "given back to the host: %s", key, domain, exc,
                        "; ".join(back) or "nothing to do")
            self._wait(key, dev, rule, domain, f"libvirt refused: {exc}")
            return True
        with self.lock:
            self.waiting.pop(key, None)
            self.attached[key] = domain
        log.info("safeusbd: attach_to: %s attached to domain %s (bus %d device %d, rule %r)",
                 key, domain, usb.busnum, usb.devnum, rule.name)
        return True


# --- this host ------------------------------------------------------------------------------

class HostLibvirt:
    """libvirt at ``uri``: a connection per question (they are rare)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def active(self, name: str) -> bool | None:
        return virt.domain_active(self.uri, name)

    def attach(self, name: str, xml: str) -> None:
        try:
            with virt.Connection.open(self.uri) as conn:
                conn.domain(name).attach(xml, virt.AFFECT_LIVE)
        except virt.VirtError as exc:
            raise LibvirtError(f"libvirt: {exc}") from None


class HostHandover:
    """Prepare and give back on this host (service.Handover), with safeusbd's policy and
    state."""

    def __init__(self, roots: Roots, policy_path: str, state_dir: str) -> None:
        from safeusb.handover.service import Handover  # noqa: PLC0415

        self.roots = roots
        self.handover = Handover.from_paths(roots, policy_path, state_dir)

    def prepare(self, key: str, domain: str) -> tuple[bool, list[str]]:
        from safeusb.host.selector import Selector, resolve  # noqa: PLC0415

        try:
            target = resolve(Selector.from_string(key), self.roots)
            outcome = self.handover.prepare(target, domain)
        except SafeUSBError as exc:
            return False, [str(exc)]
        if outcome.ok:
            return True, list(outcome.done) or ["nothing to do"]
        return False, outcome.why_not()

    def give_back(self, key: str, domain: str) -> list[str]:
        from safeusb.handover.service import release_lines  # noqa: PLC0415

        policy = self.handover.policy_for_release(lambda _text: None)
        try:
            outcome = self.handover.release_port(key, domain, policy=policy)
        except SafeUSBError as exc:
            return [f"not given back: {exc}"]
        return release_lines(outcome)
