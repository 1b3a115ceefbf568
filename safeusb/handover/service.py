"""The handover service: the one way every front end hands devices over and gives them back.

The CLI, the libvirt hook, attach-device/detach-device and safeusbd (for the QMP gate, the
kernel guard, auto-attach and udev events) each build one Handover from the policy file
and the journal directory. It reads the policy, makes the runner for each call and runs
handover.prepare/release; what comes back is a handover.Outcome, put into words by the
functions at the end, which every front end uses.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence

from safeusb.errors import SafeUSBError
from safeusb.handover.policy import Policy
from safeusb.handover.transaction import (
    Outcome,
    prepare,
    release,
    release_domain,
    release_locked,
    target_key,
)
from safeusb.host import sysfs
from safeusb.host.journal import StateDir
from safeusb.host.model import Target, UsbDevice
from safeusb.host.roots import Roots
from safeusb.host.runner import Runner
from safeusb.values import frozen


@frozen
class Taken:
    """Devices prepared by one prepare_all: what was handed over, and why the others
    were not (one line per reason, each naming its device)."""

    targets: tuple[Target, ...] = ()
    refusals: tuple[str, ...] = ()


@frozen
class Handover:
    """Prepare and release on one host, under one policy file and one journal."""

    roots: Roots
    state: StateDir
    policy_path: str
    progress: Callable[[str], None] | None = None
    dry_run: bool = False

    @classmethod
    def from_paths(cls, roots: Roots, policy_path: str, state_dir: str,
                   progress: Callable[[str], None] | None = None,
                   dry_run: bool = False) -> Handover:
        return cls(roots, StateDir(state_dir), policy_path, progress, dry_run)

    def policy(self) -> Policy:
        """The policy as the file says now (PolicyError when it cannot be read)."""
        return Policy.from_file(self.policy_path)

    def policy_for_release(self, warn: Callable[[str], None]) -> Policy | None:
        """Giving back never depends on the policy: when it cannot be read, ``warn`` is told
        and the records alone decide (they keep the restore setting of each device)."""
        try:
            return self.policy()
        except SafeUSBError as exc:
            warn(f"{exc}; giving back by the records alone")
            return None

    def runner(self, cancel: threading.Event | None = None) -> Runner:
        return Runner.for_roots(self.roots, progress=self.progress, cancel=cancel)

    def prepare(self, target: Target, domain: str | None = None, *,
                policy: Policy | None = None, timeout: float | None = None,
                cancel: threading.Event | None = None,
                after_refusal: bool = False, requester: int | None = None) -> Outcome:
        """Make the device free for a guest by the policy (the file's, unless one is
        given: the hook's carries the domain's own settings), or refuse. after_refusal,
        requester: prepared because the kernel guard refused a program the device, and
        that program while it still runs (handover.prepare)."""
        return prepare(self.roots, target, policy or self.policy(), self.runner(cancel),
                       self.state, domain=domain, timeout=timeout, requester=requester,
                       after_refusal=after_refusal, plan_only=self.dry_run)

    def prepare_all(self, targets: Sequence[Target], domain: str,
                    policy: Policy | None = None) -> Taken:
        """Prepare each device for the domain; every refusal is kept, so that the caller
        can say all of them at once and give back what was taken."""
        policy = policy or self.policy()
        taken: list[Target] = []
        refusals: list[str] = []
        for target in targets:
            outcome = self.prepare(target, domain, policy=policy)
            if outcome.ok:
                if outcome.done:
                    taken.append(target)
                continue
            refusals.extend(refusal_lines(target.describe(), outcome))
        return Taken(tuple(taken), tuple(refusals))

    def release(self, key: str, usb: UsbDevice | None = None, domain: str | None = None, *,
                policy: Policy | None = None, locked: bool = False) -> Outcome:
        """Give back what prepare took of the device named by ``key`` (its record decides
        what). ``locked``: the caller holds the device's lock already."""
        give = release_locked if locked else release
        return give(self.roots, key, policy, self.runner(), self.state, usb, domain)

    def release_target(self, target: Target, domain: str | None = None,
                       policy: Policy | None = None) -> Outcome:
        return self.release(target_key(target), target.usb, domain, policy=policy)

    def release_port(self, key: str, domain: str | None = None, *,
                     policy: Policy | None = None, locked: bool = False) -> Outcome:
        """release, for a device known by its port alone (it may have left the host)."""
        usb = None
        with contextlib.suppress(SafeUSBError):
            usb = sysfs.usb_device_at(self.roots, key)
        return self.release(key, usb, domain, policy=policy, locked=locked)

    def give_back(self, targets: Sequence[Target], domain: str,
                  policy: Policy | None = None) -> list[str]:
        """Release what one prepare_all took, last first; what could not be put back."""
        left: list[str] = []
        for target in reversed(targets):
            left.extend(self.release_target(target, domain, policy).not_undone)
        return left

    def release_domain(self, domain: str, policy: Policy | None) -> Outcome:
        """Give back every device the journal records as taken for the domain."""
        return release_domain(self.roots, domain, policy, self.runner(), self.state)


# --- outcomes in words -------------------------------------------------------------------

def refusal_lines(head: str, outcome: Outcome) -> list[str]:
    """One line per reason the device was not handed over, each naming it."""
    return [f"{head}: {r}" for r in outcome.why_not()]


def refusal_text(head: str, outcome: Outcome) -> str:
    """The reasons on one line: refused (by the policy) or could not (a step failed)."""
    verb = "refused to" if outcome.plan is not None and outcome.plan.refused else "could not"
    return f"{verb} hand over {head}: " + "; ".join(outcome.why_not())


def release_lines(outcome: Outcome, notes: bool = False) -> list[str]:
    """What a release did and did not do."""
    lines = list(outcome.done) + [f"NOT done: {u}" for u in outcome.not_undone]
    return lines + [f"note: {n}" for n in outcome.notes] if notes else lines


def outcome_lines(verb: str, head: str, outcome: Outcome) -> list[str]:
    """The CLI's account of a prepare or release: the refusal, the failure and what was
    undone, the plan of a dry run, or what was done."""
    plan = outcome.plan
    lines: list[str] = []
    if plan is not None and plan.refused:
        lines.append(f"safeusb: refused to hand over {head}:")
        lines.extend("  " + r for r in plan.refusals)
    elif outcome.error:
        lines.append(f"safeusb: could not {verb} {head}: {outcome.error}")
        lines.extend("  undone: " + u for u in outcome.undone)
        lines.extend("  NOT undone: " + u for u in outcome.not_undone)
        lines.append(f"  host state: {outcome.host_state()}")
    elif plan is not None and not outcome.done:
        lines.append(f"plan for {head} ({plan.rule}):")
        lines.extend(f"  {i}. {s.describe()}" for i, s in enumerate(plan.steps, 1))
    else:
        lines.append(f"{head}: " + ("ready for the guest" if verb == "prepare"
                                    else "given back to the host"))
        lines.extend("  done: " + d for d in outcome.done)
        lines.extend("  NOT done: " + u for u in outcome.not_undone)
    lines.extend("  note: " + n for n in outcome.notes)
    return lines
