"""prepare and release: carry out a plan with rollback, and put back what was taken."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from safeusb.errors import SafeUSBError
from safeusb.handover.plan import Plan, build_plan, hold_targets, teardown_steps
from safeusb.handover.policy import Policy
from safeusb.handover.steps import (
    Flush,
    Handoff,
    Kill,
    Step,
    UndoImpossible,
    Unmount,
    step_from_json,
)
from safeusb.host import sysfs
from safeusb.host.journal import DeviceBusy, StateDir, StateError, new_record
from safeusb.host.model import Snapshot, Target, UsbDevice, node
from safeusb.host.roots import Roots
from safeusb.host.runner import DeviceGone, NothingToDo, Runner, StepFailed
from safeusb.host.snapshot import read_snapshot
from safeusb.inspect.decide import inspect


def target_key(target: Target) -> str:
    return target.usb.sysname if target.usb else (target.block or "?")


@dataclass
class Outcome:
    """What happened, in words a person can act on."""

    ok: bool
    plan: Plan | None = None
    done: list[str] = field(default_factory=list)
    error: str | None = None
    undone: list[str] = field(default_factory=list)
    not_undone: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # how long each step done took
    read_seconds: float | None = None  # how long reading the host and deciding took
    release: bool = False  # the outcome of giving back, not of preparing

    def host_state(self) -> str:
        if self.ok:
            if not self.done:
                return "nothing to do"
            return "given back" if self.release else "handed over"
        if self.release:
            return "not all given back: " + "; ".join(self.not_undone)
        if not self.done:
            return "unchanged: nothing was done"
        if not self.not_undone:
            return "as before: every step was undone"
        return "changed: " + "; ".join(self.not_undone)

    def why_not(self) -> list[str]:
        """Why the device was not handed over: the refusals, or the failure and the state
        the host is left in."""
        if self.plan is not None and self.plan.refused:
            return list(self.plan.refusals)
        return [f"{self.error}; host state: {self.host_state()}"]

    def as_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "ok": self.ok,
            "refused": bool(plan and plan.refused),
            "reasons": list(plan.refusals) if plan else [],
            "rule": plan.rule if plan else None,
            "steps": [s.as_json() for s in plan.steps] if plan else [],
            "done": self.done,
            "seconds": self.seconds,
            "read_seconds": self.read_seconds,
            "error": self.error,
            "undone": self.undone,
            "not_undone": self.not_undone,
            "host_state": self.host_state(),
            "notes": self.notes,
        }


def without_request(snap: Snapshot, pid: int) -> Snapshot:
    """The snapshot without process ``pid`` holding the USB device's own usbfs node
    (``/dev/bus/usb/BBB/DDD``). That process asked for the device and the kernel guard
    refused it; it may keep the node open (QEMU's usb-host goes on with a dead device, and
    a domain's QEMU keeps it until the device is detached), which uses nothing on the
    host. Everything else it holds (a disk of the device, a file on it) still counts."""
    usbfs = {(n.kind, n.devnum) for n in snap.nodes
             if n.kind == "char" and n.subsystem == "usb" and n.devname.startswith("bus/usb/")}
    return replace(snap, uses=tuple(u for u in snap.uses
                                    if not (u.pid == pid and u.node in usbfs)))


def prepare(
    roots: Roots,
    target: Target,
    policy: Policy,
    runner: Runner,
    state: StateDir,
    domain: str | None = None,
    timeout: float | None = None,
    requester: int | None = None,
    after_refusal: bool = False,
    plan_only: bool = False,
) -> Outcome:
    """Make the device free for a guest, by the policy, or refuse with the reasons.

    after_refusal: prepared because the kernel guard refused a program the device; the
    record says so (journal.Record.after_refusal), so that safeusbd counts the device as
    taken by its guest only once an interface is claimed (safeusb.safeusbd.events).
    requester: that program, when the caller checked it is still the process refused: its
    holding the device's own usbfs node is its request, not a use (see without_request)."""
    key = target_key(target)
    with state.lock(key):
        record = state.load(key)
        if record is not None:
            if record.domain != domain:
                who = f"domain {record.domain}" if record.domain else "an earlier prepare"
                raise DeviceBusy(f"{key} is in use by {who} (release it first)")
            if not any(s.get("kind") == Handoff.kind for s in record.steps):
                raise DeviceBusy(f"{key}: an earlier prepare stopped part-way "
                                 f"({len(record.steps)} steps done, not handed over); "
                                 f"run `safeusb release {key}` to put them back first")
            return Outcome(True, notes=[f"{key} was already prepared for this domain"])
        began = time.monotonic()
        runner.ensure_debugfs(roots)
        snap = read_snapshot(roots, target)
        if requester is not None:
            snap = without_request(snap, requester)
        findings = inspect(snap)
        settings, rule = policy.settings_for(target.usb, domain)
        plan = build_plan(findings, settings, rule)
        outcome = Outcome(False, plan, notes=list(findings.notes),
                          read_seconds=round(time.monotonic() - began, 3))
        if plan.refused:
            return outcome
        runner.flush_timeout = timeout if timeout is not None else settings.flush_timeout
        if plan_only:
            outcome.ok = True
            return outcome
        holds = hold_targets(findings.snapshot)
        done: list[Step] = []
        try:
            runner.check_cancelled()
            # Before anything is changed: /run must take the record that release needs.
            state.save(new_record(key, domain, [], settings.restore, after_refusal))
            runner.hold(holds)

            def carry_out(step: Step) -> None:
                runner.check_cancelled()
                began = time.monotonic()
                try:
                    step.execute(runner)
                except NothingToDo as gone:
                    outcome.notes.append(str(gone))
                    runner.hold(holds)
                    return
                outcome.seconds.append(round(time.monotonic() - began, 3))
                done.append(step)
                outcome.done.append(step.describe())
                state.save(new_record(key, domain, [s.as_json() for s in done],
                                      settings.restore, after_refusal))
                if not isinstance(step, Handoff):
                    runner.hold(holds)  # claim what this step freed, at once

            *teardown, handoff = plan.steps
            for step in teardown:
                carry_out(step)
            for step in _late_mounts(roots, target, runner, holds):
                carry_out(step)
            carry_out(handoff)
        except (StepFailed, StateError, OSError) as exc:
            runner.release_holds()
            outcome.error = str(exc)
            if target.usb is not None and not isinstance(exc, DeviceGone) \
                    and _left_the_host(roots, target.usb):
                outcome.error = f"{key} left the host during prepare: {exc}"
            _give_back(done, runner, roots, key, True, outcome.undone, outcome.not_undone,
                       outcome.notes)
            if not outcome.not_undone:
                state.remove(key)
                _guard_forget(roots, state)
            return outcome
        outcome.ok = True
        return outcome


def _left_the_host(roots: Roots, usb: UsbDevice) -> bool:
    """The USB device is no longer at its port, or another device is there now."""
    try:
        now = sysfs.usb_device_at(roots, usb.sysname)
    except SafeUSBError:
        return True
    return now is None or (now.busnum, now.devnum) != (usb.busnum, usb.devnum)


def _late_mounts(roots: Roots, target: Target, runner: Runner, holds: tuple[str, ...],
                 tries: int = 20) -> Iterator[Step]:
    """Mounts made while the device was still mounted (during the flush) share its
    filesystem and escaped the plan: yield unmounts for them, until every hold is taken.
    Anything else that still claims the device fails the handoff, with rollback."""
    for _ in range(tries):
        if not runner.hold(holds):
            return
        late = [s for s in teardown_steps(read_snapshot(roots, target))
                if isinstance(s, Unmount)]
        if not late:
            time.sleep(0.02)  # a mount on its way in or out holds it for a moment
        yield from late


def _give_back(steps: list[Step], runner: Runner, roots: Roots, key: str,
               restore: bool, done: list[str], failed: list[str], notes: list[str]) -> None:
    """Undo the steps in reverse; after rebinding, wait for the disks to come back and
    follow them if the kernel named them anew."""
    renames: dict[str, str] = {}
    try:
        for recorded in reversed(steps):
            step = _renamed(recorded, renames)
            if isinstance(step, Kill | Flush):
                continue
            if not isinstance(step, Handoff) and not restore:
                notes.append(f"not restored (restore = false): {step.describe()}")
                continue
            try:
                step.undo(runner)
                if isinstance(step, Handoff) and step.interfaces:
                    renames.update(_wait_present(roots, key, step.disks))
                done.append(step.describe())
            except UndoImpossible as exc:
                failed.append(str(exc))
            except (StepFailed, OSError) as exc:
                failed.append(f"{step.describe()}: undo failed: {exc}")
    finally:
        runner.let_go_of_loops()  # loops set to autoclear: their users are back now


def release(
    roots: Roots,
    key: str,
    policy: Policy | None,
    runner: Runner,
    state: StateDir,
    usb: Any = None,
    domain: str | None = None,
) -> Outcome:
    """Give back what prepare took: rebind drivers; with restore = true, reactivate
    holders and remount. Idempotent: without a record there is nothing to do.

    What to give back comes from the record alone, and so does restore (the policy's
    setting when the device was taken); the policy is asked only for records written
    before they carried it, and may be None (unreadable): restore then holds."""
    with state.lock(key, wait=RELEASE_LOCK_WAIT):
        return release_locked(roots, key, policy, runner, state, usb, domain)


# A release that finds the device's lock taken waits this long: safeusbd may be giving the
# same device back on its own (its QEMU let go), and then there is nothing left to do.
RELEASE_LOCK_WAIT = 60.0


def release_locked(roots: Roots, key: str, policy: Policy | None, runner: Runner,
                   state: StateDir, usb: Any = None, domain: str | None = None) -> Outcome:
    """release, for a caller that holds the device's lock (state.lock(key))."""
    record = state.load(key)
    outcome = Outcome(True, release=True)
    if record is None:
        outcome.notes.append(f"{key}: nothing recorded; nothing to release")
        return outcome
    restore = record.restore
    if restore is None:
        restore = True if policy is None else \
            policy.settings_for(usb, domain or record.domain)[0].restore
    steps = [step_from_json(s) for s in record.steps]
    undone: list[str] = []
    _give_back(steps, runner, roots, key, restore, undone, outcome.not_undone,
               outcome.notes)
    outcome.done.extend(f"undo: {d}" for d in undone)
    outcome.ok = not outcome.not_undone
    state.remove(key)
    _guard_forget(roots, state)
    return outcome


def _guard_forget(roots: Roots, state: StateDir) -> None:
    """The kernel guard stops refusing binds for devices whose records are gone."""
    if not roots.own_kernel:
        return  # a recording's tree: the guard is this host's kernel's
    from safeusb.host.guard import forget_released  # noqa: PLC0415

    forget_released(state.path)


def _disk_of(node: str) -> str:
    return sysfs.whole_disk_name(os.path.basename(node))


def _wait_present(roots: Roots, key: str, nodes: tuple[str, ...],
                  timeout: float = 20.0) -> dict[str, str]:
    """Wait for the disks to come back under the USB port after binding; the kernel may
    give them new names (sdb for sda): return the renames of whole disks."""
    old = sorted({_disk_of(n) for n in nodes})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        disks = sysfs.whole_disks_under(roots, key)
        if len(disks) >= len(old) and all(
            sysfs.block_exists(roots, n.replace(o, d, 1))
            for o, d in zip(old, disks, strict=False) for n in
            (os.path.basename(x) for x in nodes if _disk_of(x) == o)
        ):
            return {o: d for o, d in zip(old, disks, strict=False) if o != d}
        time.sleep(0.1)
    raise StepFailed(f"{', '.join(nodes)} did not come back within {timeout:g} s")


def _renamed(step: Step, renames: dict[str, str]) -> Step:
    """The step with device paths updated for disks that came back under new names."""
    if not renames:
        return step
    doc = step.as_json()

    def fix(value: Any) -> Any:
        if isinstance(value, str):
            for old, new in renames.items():
                was = node(old)
                if value == was or (value.startswith(was) and value[len(was):].isdigit()):
                    return node(new) + value[len(was):]
            return value
        if isinstance(value, list | tuple):
            return [fix(v) for v in value]
        return value

    return step_from_json({k: fix(v) for k, v in doc.items()})


def release_domain(roots: Roots, domain: str, policy: Policy | None, runner: Runner,
                   state: StateDir) -> Outcome:
    """Release every device recorded as taken for the domain, each on its own: one that
    fails, and every record that cannot be read, is a line of not_undone."""
    total = Outcome(True, release=True)
    keys, unreadable = state.keys_for_domain(domain)
    total.not_undone.extend(f"{p} (it may be one that domain {domain} took)"
                            for p in unreadable)
    for key in keys:
        try:
            usb = sysfs.usb_device_at(roots, key)
            one = release(roots, key, policy, runner, state, usb=usb, domain=domain)
        except SafeUSBError as exc:
            total.not_undone.append(f"{key}: {exc}")
            continue
        total.done.extend(one.done)
        total.not_undone.extend(one.not_undone)
        total.notes.extend(one.notes)
    total.ok = not total.not_undone
    return total
