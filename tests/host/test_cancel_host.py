"""A prepare whose requester gives up (the gate's deadline) stops and puts the host back."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from safeusb.handover.policy import Policy
from safeusb.handover.transaction import prepare
from safeusb.host.journal import StateDir
from safeusb.host.roots import Roots
from safeusb.host.runner import Runner
from safeusb.host.selector import Selector, resolve
from tests.host.conftest import Loop, background, wait_for
from tests.host.test_prepare_host import UNMOUNT, _mounted_in, _ns_mount, stalled_mount

pytestmark = [pytest.mark.host, pytest.mark.fault]


class _CancelAfterFirstUnmount(Runner):
    """The requester gives up right after the first mount is taken down."""

    def umount_in(self, pid: int, mnt_ns: int, mountpoint: str) -> None:
        super().umount_in(pid, mnt_ns, mountpoint)
        assert self.cancel is not None
        self.cancel.set()


def test_cancel_between_steps_undoes_what_was_done(loop_ext4: Loop, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with background(_ns_mount(loop_ext4, a)) as pa, background(_ns_mount(loop_ext4, b)) as pb:
        wait_for(lambda: _mounted_in(pa.pid, a) and _mounted_in(pb.pid, b))
        roots = Roots.host()
        target = resolve(Selector.from_string(loop_ext4.node), roots)
        runner = _CancelAfterFirstUnmount(cancel=threading.Event())
        outcome = prepare(roots, target, Policy.from_text(UNMOUNT), runner,
                          StateDir(str(tmp_path / "state")))
        assert not outcome.ok and "cancelled" in (outcome.error or ""), outcome
        assert len(outcome.done) >= 2 and outcome.not_undone == []  # flush + one unmount
        assert outcome.host_state() == "as before: every step was undone"
        assert _mounted_in(pa.pid, a) and _mounted_in(pb.pid, b)
        assert not (tmp_path / "state" / f"{loop_ext4.name}.json").exists()


def test_cancel_before_anything_changes_nothing(loop_ext4: Loop, tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    with background(_ns_mount(loop_ext4, mnt)) as proc:
        wait_for(lambda: _mounted_in(proc.pid, mnt))
        roots = Roots.host()
        target = resolve(Selector.from_string(loop_ext4.node), roots)
        cancel = threading.Event()
        cancel.set()
        outcome = prepare(roots, target, Policy.from_text(UNMOUNT), Runner(cancel=cancel),
                          StateDir(str(tmp_path / "state")))
        assert not outcome.ok and outcome.host_state() == "unchanged: nothing was done"
        assert _mounted_in(proc.pid, mnt)
        assert not (tmp_path / "state" / f"{loop_ext4.name}.json").exists()


def test_cancel_during_a_stalled_flush(loop_ext4: Loop, tmp_path: Path) -> None:
    """The flush cannot complete and its timeout is far off: a cancel stops it at once,
    and nothing was unmounted."""
    with stalled_mount(loop_ext4, tmp_path) as (inner, mnt, pid):
        roots = Roots.host()
        target = resolve(Selector.from_string(inner.node), roots)
        cancel = threading.Event()
        timer = threading.Timer(1.0, cancel.set)
        timer.start()
        outcome = prepare(roots, target, Policy.from_text(UNMOUNT), Runner(cancel=cancel),
                          StateDir(str(tmp_path / "state")), timeout=600.0)
        timer.cancel()
        assert not outcome.ok
        assert "cancelled" in (outcome.error or "") and "nothing was unmounted" in (
            outcome.error or ""), outcome
        assert outcome.host_state() == "unchanged: nothing was done"
        assert _mounted_in(pid, mnt)
        assert not (tmp_path / "state" / f"{inner.name}.json").exists()
