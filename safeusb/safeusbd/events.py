"""safeusbd follows the kernel: a device handed over comes back when its QEMU lets go.

prepare leaves a record under the state directory (/run/safeusb/KEY.json) for every device
it handed over. This module watches those devices through the kernel's uevents (pyudev)
and decides, for each record with a handoff:

- **held**: the domain's QEMU (the pid libvirt keeps in /run/libvirt/qemu/NAME.pid) has
  the device's usbfs node (``/dev/bus/usb/BBB/DDD``, char 189:N, matched by device
  number, so a node in QEMU's private /dev counts) open; another process opening it for
  a moment (lsusb, a udev helper) takes nothing. A record without a domain has no
  process to tell from such a probe: it is held once an interface is claimed (the
  ``usbfs`` driver bound), and so is a device safeusbd prepared because the kernel guard
  refused a program it (the record says ``after_refusal``); once held, the node open
  alone keeps it held (a reset in progress). The QEMU the guard refused
  goes on with a dead device and keeps the node open with nothing claimed; closing it
  (``virsh detach-device`` of that dead device, QEMU stopped before the second attempt)
  must not give the device back, or the second attempt would find it on the host again.
  Every other record keeps the rule above: a domain that never claims the device (paused,
  its firmware has not configured it yet) still holds it with the node open;
- **let go**: it was seen held and now no interface is claimed and nobody has the node
  open: QEMU closed it (``virsh detach-device``, guest shutdown, QEMU killed), so it is
  given back by its record
  (drivers bound again, and with ``restore = true`` holders reactivated and filesystems
  remounted), logged, and the record is removed;
- **gone**: the USB device is no longer at its port, or another device is (a new device
  number): it left the host for good; its record is removed and what it could not give
  back is logged.

A record that was never seen held is left alone: between prepare and QEMU opening the
device (the hook's prepare runs before QEMU starts; the gate's before it forwards
``device_add``) the device is unclaimed and closed, exactly as after QEMU let go. It is
given back only when its domain stops (libvirt's lifecycle event, see
``safeusb.safeusbd.domains``) or, when safeusbd starts, if libvirt says its domain is not running.

QEMU releases the interfaces (uevents) a moment before it closes the node (no uevent), so
a device whose interfaces are free but whose node is still open is looked at again a few
times in the next seconds, and every held device is looked at again every
``RECHECK_HELD`` seconds in any case. QEMU opening the node makes no uevent either, and a
paused guest claims nothing: a device not yet opened is looked at again the same way for
``WATCH_NEW`` seconds after it is first followed, so that a detach soon after the attach
finds it held.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from safeusb.errors import SafeUSBError
from safeusb.host import defaults, files, sysfs, virt
from safeusb.host.journal import DeviceBusy, Record, StateDir, StateError
from safeusb.host.procfs import node_holders
from safeusb.host.roots import Roots
from safeusb.host.sysfs import DeviceNow, device_now
from safeusb.values import frozen

log = logging.getLogger("safeusb")

SETTLE = 0.3  # seconds of quiet after a uevent before the devices are looked at
FOLLOW_UP = (0.5, 1.0, 2.0, 4.0, 8.0)  # after the interfaces were freed: node still open?
RECHECK_HELD = 15.0  # a held device is looked at again this often, events or not
# A device not yet opened by QEMU is looked at again soon (the follow-ups) this long after
# it is first followed: QEMU opening the node makes no uevent, and a paused guest claims
# nothing, so without these a detach within RECHECK_HELD would find it never held.
WATCH_NEW = 30.0


@frozen
class UEvent:
    """What the kernel (or udevd) said: action, the device's sysfs path, its driver."""

    action: str
    sys_path: str
    driver: str | None = None


class EventSource(Protocol):
    def poll(self, timeout: float | None) -> UEvent | None: ...

    def close(self) -> None: ...


def udevd_running(control: str = defaults.UDEV_CONTROL) -> bool:
    """udevd listens on its control socket while it runs."""
    return files.is_socket(control)


class PyudevSource:
    """USB uevents through pyudev. With udevd running, udevd's events (sent once its rules
    ran, so device nodes and links exist); without it (containers, minimal systems, the
    VM tier's guest), the kernel's own uevents."""

    def __init__(self, source: str | None = None) -> None:
        import pyudev  # noqa: PLC0415

        self.source = source or ("udev" if udevd_running() else "kernel")
        self.context = pyudev.Context()
        self.monitor = pyudev.Monitor.from_netlink(self.context, source=self.source)
        self.monitor.filter_by(subsystem="usb")
        self.monitor.start()

    def poll(self, timeout: float | None) -> UEvent | None:
        device = self.monitor.poll(timeout=timeout)
        if device is None:
            return None
        return UEvent(str(device.action or ""), str(device.sys_path), device.driver)

    def close(self) -> None:
        """pyudev closes the netlink socket when the monitor is collected."""
        self.monitor = None


# --- following the records -----------------------------------------------------------------

HELD, WAITING = "held", "waiting"


@dataclass
class Tracked:
    dev: str  # the usbfs node's device number when first seen: the device's identity
    phase: str  # HELD or WAITING
    domain: str | None
    domain_stopped: bool = False
    since: float = 0.0  # the monotonic time it was first followed


def handed_over(record: Record) -> bool:
    """The record's device went to a guest: its handoff unbound USB interfaces."""
    return any(s.get("kind") == "handoff" and s.get("interfaces") for s in record.steps)


class GiveBack(Protocol):
    """Give the device back by its record; the caller holds the device's lock."""

    def __call__(self, key: str, record: Record) -> tuple[bool, list[str]]: ...


class HandoverWatch:
    """The records under the state directory and what their devices do (see the module's
    docstring). ``scan`` looks at every record once and acts; it is called from the
    event thread only."""

    def __init__(self, roots: Roots, state: StateDir, give_back: GiveBack,
                 holders: Callable[[str], list[tuple[int, str]]] | None = None,
                 domain_active: Callable[[str], bool | None] | None = None,
                 domain_pid: Callable[[str], int | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.roots = roots
        self.clock = clock
        self.state = state
        self.give_back = give_back
        self.holders = holders or (lambda dev: node_holders(roots, dev))
        self.domain_pid = domain_pid or virt.qemu_pid
        self.domain_active = domain_active or (lambda _name: None)
        self.tracked: dict[str, Tracked] = {}
        self.stopped: set[str] = set()  # domains libvirt said stopped, not yet handled
        self.lock = threading.Lock()
        self.started = False

    def watching(self) -> bool:
        """Whether any handed-over device is being followed (safeusbd then stays up)."""
        with self.lock:
            return bool(self.tracked)

    def domain_stopped(self, name: str) -> None:
        with self.lock:
            self.stopped.add(name)

    def scan(self) -> bool:
        """Look at every record; return True when one should be looked at again soon (its
        interfaces are free but its node is still open, its lock was taken, or it was
        prepared moments ago and QEMU has not opened it yet)."""
        keys, problems = self.state.keys()
        for p in problems:
            log.warning("safeusbd: %s", p)
        startup = not self.started
        self.started = True
        with self.lock:
            stopped, self.stopped = self.stopped, set()
        again = False
        for key in keys:
            try:
                again |= self._one(key, startup, stopped)
            except DeviceBusy:
                again = True  # a prepare or release of its own is running
            except (SafeUSBError, OSError) as exc:
                log.warning("safeusbd: %s: not followed: %s", key, exc)
        with self.lock:
            for key in set(self.tracked) - set(keys):
                del self.tracked[key]  # released or removed by someone else
        if self.roots.own_kernel:
            from safeusb.host.guard import forget_released  # noqa: PLC0415

            forget_released(self.state.path)  # devices that left or were given back
        return again

    def _one(self, key: str, startup: bool, stopped: set[str]) -> bool:
        record = self.state.load(key)
        if record is None or not handed_over(record):
            return False  # a prepare still running, or one that stopped part-way
        now = device_now(self.roots, key)
        with self.lock:
            tracked = self.tracked.get(key)
        if now is None or (tracked is not None and tracked.dev != now.dev):
            self._gone(key, record, now)
            return False
        holders = self.holders(now.dev)
        busy = now.claimed or bool(holders)
        held = self._takes(record, tracked, now, holders)
        if tracked is None:
            tracked = Tracked(now.dev, HELD if held else WAITING, record.domain,
                              since=self.clock())
            if not held and startup and record.domain is not None \
                    and self.domain_active(record.domain) is False:
                tracked.domain_stopped = True
            with self.lock:
                self.tracked[key] = tracked
            log.info("safeusbd: following %s (handed over%s): %s", key,
                     f" to domain {record.domain}" if record.domain else "",
                     "held by its domain" if held else "not yet opened by QEMU")
        if record.domain in stopped:
            tracked.domain_stopped = True
        if held:
            if tracked.phase != HELD:
                log.info("safeusbd: %s is taken by %s", key,
                         f"domain {record.domain}" if record.domain else "its guest")
            tracked.phase = HELD
            # Open with no interface claimed: QEMU may be about to close it (it frees the
            # interfaces first); look again soon.
            return not now.claimed
        if tracked.phase != HELD and not tracked.domain_stopped:
            # not yet taken: QEMU has still to open it; soon, after a prepare just done
            return self.clock() - tracked.since < WATCH_NEW
        if busy:
            return True  # its QEMU let go, another process has it open for now
        self._let_go(key, tracked)
        return False

    def _held_by_domain(self, domain: str | None, now: DeviceNow,
                        holders: list[tuple[int, str]]) -> bool:
        """The domain's QEMU (libvirt's pid for it) has the node open. Any other process
        opening it for a moment (lsusb, a udev helper) takes nothing. For a record without
        a domain, anyone holding or claiming it counts."""
        if domain is None:
            return now.claimed or bool(holders)
        pid = self.domain_pid(domain)
        return pid is not None and any(p == pid for p, _ in holders)

    def _takes(self, record: Record, tracked: Tracked | None, now: DeviceNow,
               holders: list[tuple[int, str]]) -> bool:
        """Whether the record's guest holds the device now. A device prepared on a guard
        refusal, or for no domain, is taken only with an interface claimed, unless it was
        held already (see the module's docstring)."""
        held = self._held_by_domain(record.domain, now, holders)
        if (record.after_refusal or record.domain is None) and not now.claimed:
            return held and tracked is not None and tracked.phase == HELD
        return held

    def _let_go(self, key: str, tracked: Tracked) -> None:
        why = "its domain stopped" if tracked.phase != HELD else \
            "QEMU let go of it (no interface claimed, its node closed)"
        with self.state.lock(key):
            record = self.state.load(key)
            if record is None:
                return
            now = device_now(self.roots, key)  # again, under the lock
            if now is None or now.dev != tracked.dev:
                self._gone(key, record, now, locked=True)
                return
            holders = self.holders(now.dev)
            if now.claimed or holders:
                if self._takes(record, tracked, now, holders):
                    tracked.phase = HELD
                return
            log.info("safeusbd: %s is back on the host (%s); giving it back by its record",
                     key, why)
            ok, lines = self.give_back(key, record)
        with self.lock:
            self.tracked.pop(key, None)
        for line in lines:
            log.info("safeusbd: %s: %s", key, line)
        if ok:
            log.info("safeusbd: %s: given back to the host; record removed", key)
        else:
            log.warning("safeusbd: %s: not all given back; record removed", key)

    def _gone(self, key: str, record: Record, now: DeviceNow | None,
              locked: bool = False) -> None:
        where = "no device is at its port" if now is None else \
            f"another device is at its port now ({now.dev})"
        with contextlib.ExitStack() as stack:
            if not locked:
                stack.enter_context(self.state.lock(key))
                again = self.state.load(key)
                if again is None or again.created != record.created:
                    return
            self.state.remove(key)
        with self.lock:
            self.tracked.pop(key, None)
        lost = [str(s.get("text", s.get("kind"))) for s in record.steps
                if s.get("kind") not in ("flush", "kill")]
        log.warning("safeusbd: %s left the host while handed over%s (%s); record removed; "
                    "not given back: %s", key,
                    f" to domain {record.domain}" if record.domain else "", where,
                    "; ".join(lost) or "nothing")


# --- the thread ----------------------------------------------------------------------------

class EventLoop:
    """Reads uevents and runs the watch: a scan after each burst of USB events (once
    SETTLE seconds passed without another), follow-ups while a node stays open after its
    interfaces were freed, a scan every RECHECK_HELD seconds while devices are followed,
    and one whenever poke() is called (a prepare finished, a domain stopped)."""

    def __init__(self, watch: HandoverWatch, source: EventSource,
                 settle: float = SETTLE, follow_up: tuple[float, ...] = FOLLOW_UP,
                 recheck: float = RECHECK_HELD, attach: Any = None,
                 keep: Callable[[], None] | None = None) -> None:
        self.watch = watch
        # run whenever the kernel's uevent count (every device's, not only USB's) has
        # stood for ``settle`` seconds after it moved, and once at the start: what
        # decisions read of the device tree is read then (server.keep_devices)
        self.keep = keep
        self._count: int | None = None
        self._count_since = 0.0
        self._kept = False
        self.attach = attach  # safeusb.safeusbd.autoattach.AutoAttach: devices plugged in
        self.source = source
        self.settle = settle
        self.follow_up = follow_up
        self.recheck = recheck
        self.stopping = threading.Event()
        self.pokes: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="safeusbd-events")
        self.scans = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.pokes.put("stop")
        self.thread.join(timeout=120)  # a give-back in progress finishes first
        self.source.close()

    def poke(self, why: str) -> None:
        self.pokes.put(why)

    def _scan(self) -> bool:
        self.scans += 1
        again = False
        try:
            again = self.watch.scan()
        except Exception:  # the watch never ends the daemon
            log.exception("safeusbd: internal error following handed-over devices")
        if self.attach is not None:
            try:
                again |= bool(self.attach.scan())
            except Exception:
                log.exception("safeusbd: internal error handing plugged-in devices over")
        return again

    def _run(self) -> None:
        follow = 0
        due: float | None = time.monotonic()  # monotonic time of the next scan
        first: float | None = None  # when the events not yet scanned for began
        while not self.stopping.is_set():
            now = time.monotonic()
            wait = 0.2 if due is None else max(0.0, min(0.2, due - now))
            item = self._next(wait)
            if self.stopping.is_set():
                return
            now = time.monotonic()
            if isinstance(item, UEvent) and item.action == "add" and self.attach is not None:
                self.attach.added(item.sys_path)
            if item is not None:  # wait for quiet, but never more than a few settles
                first = now if first is None else first
                due = min(now + self.settle, first + 10 * self.settle)
                follow = 0
                continue
            if due is None or now < due:
                if item is None:
                    self._keep_when_quiet(now)
                continue
            first = None
            if self._scan() and follow < len(self.follow_up):
                due = time.monotonic() + self.follow_up[follow]
                follow += 1
            else:
                follow = 0
                due = time.monotonic() + self.recheck if self.watch.watching() else None

    def _keep_when_quiet(self, now: float) -> None:
        if self.keep is None:
            return
        count = self.watch.roots.uevent_count()
        if count != self._count:
            self._count, self._count_since, self._kept = count, now, False
        elif not self._kept and now - self._count_since >= self.settle:
            self._kept = True
            try:
                self.keep()
            except Exception:  # never ends the daemon; a decision reads for itself
                log.exception("safeusbd: internal error reading the USB devices ahead")

    def _next(self, wait: float) -> UEvent | str | None:
        """A uevent, a poke, or None after ``wait`` seconds of neither."""
        try:
            return self.pokes.get_nowait()
        except queue.Empty:
            pass
        try:
            return self.source.poll(wait)
        except OSError as exc:
            log.warning("safeusbd: reading uevents failed: %s", exc)
            time.sleep(wait)
            return None


def host_give_back(roots: Roots, state: StateDir, policy_path: str) -> GiveBack:
    """Give a device back on this host by its record (service.Handover, under the lock the
    caller holds)."""

    def give_back(key: str, record: Record) -> tuple[bool, list[str]]:
        from safeusb.handover.service import Handover, release_lines  # noqa: PLC0415

        handover = Handover(roots, state, policy_path)
        policy = handover.policy_for_release(lambda text: log.warning("safeusbd: %s", text))
        try:
            outcome = handover.release_port(key, record.domain, policy=policy, locked=True)
        except StateError as exc:
            return False, [f"not given back: {exc}"]
        return outcome.ok, release_lines(outcome, notes=True)

    return give_back


def start(roots: Roots, state_dir: str, policy_path: str,
          domain_active: Callable[[str], bool | None] | None = None,
          source: Any = None, attach: Any = None,
          keep: Callable[[], None] | None = None) -> tuple[HandoverWatch, EventLoop] | None:
    """The watch and its running event thread, or None (logged) when uevents cannot be
    read here (no pyudev, no netlink). With ``attach`` (safeusb.safeusbd.autoattach.AutoAttach),
    USB devices that arrive are handed to it, and so are devices given back."""
    state = StateDir(state_dir)
    give_back = host_give_back(roots, state, policy_path)
    if attach is not None:
        plain = give_back

        def give_back(key: str, record: Record) -> tuple[bool, list[str]]:
            result = plain(key, record)
            attach.returned(key)
            return result

    watch = HandoverWatch(roots, state, give_back, domain_active=domain_active)
    try:
        src = source or PyudevSource()
    except (ImportError, OSError) as exc:
        log.warning("safeusbd: cannot read uevents (%s); devices handed over are not given "
                    "back on their own: run `safeusb release`", exc)
        return None
    log.info("safeusbd: following USB devices through %s uevents",
             getattr(src, "source", "the given"))
    loop = EventLoop(watch, src, attach=attach, keep=keep)
    if attach is not None:
        for name in sysfs.usb_port_names(roots):  # decided as if they arrived now
            attach.added(sysfs.port_path(roots, name))
    loop.start()
    return watch, loop
