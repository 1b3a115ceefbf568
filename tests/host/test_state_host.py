"""The record release needs cannot be written (/run full): prepare changes nothing, or
rolls back what it did; a prepare that stopped part-way is never taken for a finished one.
Real tmpfs filesystems that are full, real loop devices and mounts."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from safeusb.handover.policy import Policy
from safeusb.handover.transaction import prepare, release
from safeusb.host.journal import DeviceBusy, Record, StateDir, StateError
from safeusb.host.roots import Roots
from safeusb.host.runner import Runner
from safeusb.host.selector import Selector, resolve
from tests.host.conftest import Loop, mounted, run

pytestmark = [pytest.mark.host, pytest.mark.fault]

UNMOUNT = '[defaults]\nmount = "unmount"\n'
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def one_page_run(tmp_path: Path) -> Iterator[Path]:
    """A private tmpfs of a single page, standing in for a nearly full /run."""
    where = tmp_path / "run-safeusb"
    where.mkdir()
    run("mount", "-t", "tmpfs", "-o", f"size={PAGE},mode=0700", "safeusb-test", str(where))
    try:
        yield where
    finally:
        run("umount", str(where), check=False)


def _fill(where: Path) -> None:
    fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * PAGE)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def _write_data(mnt: Path) -> str:
    data = os.urandom(2 * 1024 * 1024)
    (mnt / "data.bin").write_bytes(data)  # left dirty: the flush has work to do
    return hashlib.sha256(data).hexdigest()


def _is_mounted(node: str, mnt: Path) -> bool:
    return any(line.split()[:2] == [node, str(mnt)]
               for line in Path("/proc/self/mounts").read_text().splitlines())


def _prepare(loop: Loop, state: StateDir):  # type: ignore[no-untyped-def]
    roots = Roots.host()
    target = resolve(Selector.from_string(loop.node), roots)
    return prepare(roots, target, Policy.from_text(UNMOUNT), Runner(), state)


def test_run_full_before_anything_changes_nothing(loop_ext4: Loop, tmp_path: Path,
                                                 one_page_run: Path) -> None:
    _fill(one_page_run)
    with mounted(loop_ext4.node, tmp_path / "m") as mnt:
        sha = _write_data(mnt)
        outcome = _prepare(loop_ext4, StateDir(str(one_page_run)))
        assert not outcome.ok
        assert "No space left on device" in (outcome.error or ""), outcome
        assert outcome.done == [] and outcome.host_state() == "unchanged: nothing was done"
        assert _is_mounted(loop_ext4.node, mnt)
        assert hashlib.sha256((mnt / "data.bin").read_bytes()).hexdigest() == sha
    assert run("e2fsck", "-fn", loop_ext4.node, check=False).returncode == 0


def test_run_full_midway_rolls_back(loop_ext4: Loop, tmp_path: Path,
                                    one_page_run: Path) -> None:
    """One page: the first record goes in, the next (written beside it, then renamed)
    does not. Whatever was done by then is undone and the record removed."""
    with mounted(loop_ext4.node, tmp_path / "m") as mnt:
        sha = _write_data(mnt)
        outcome = _prepare(loop_ext4, StateDir(str(one_page_run)))
        assert not outcome.ok
        assert "No space left on device" in (outcome.error or ""), outcome
        assert outcome.done, "the first step should have been carried out"
        assert outcome.host_state() == "as before: every step was undone", outcome
        assert _is_mounted(loop_ext4.node, mnt)
        assert not (one_page_run / f"{loop_ext4.name}.json").exists()
        assert hashlib.sha256((mnt / "data.bin").read_bytes()).hexdigest() == sha


class _LosesRecordAfterUnmount(StateDir):
    """A state directory that cannot take the record once an unmount is in it."""

    def save(self, record: Record) -> None:
        if any(s.get("kind") == "unmount" for s in record.steps):
            raise StateError(f"cannot record state in {self.path}: No space left on device")
        super().save(record)


def test_record_lost_after_unmount_remounts(loop_ext4: Loop, tmp_path: Path) -> None:
    with mounted(loop_ext4.node, tmp_path / "m") as mnt:
        sha = _write_data(mnt)
        outcome = _prepare(loop_ext4, _LosesRecordAfterUnmount(str(tmp_path / "state")))
        assert not outcome.ok and "No space left" in (outcome.error or "")
        assert any(u.startswith("unmount ") for u in outcome.undone), outcome
        assert outcome.host_state() == "as before: every step was undone"
        assert _is_mounted(loop_ext4.node, mnt)
        assert hashlib.sha256((mnt / "data.bin").read_bytes()).hexdigest() == sha


def test_prepare_stopped_partway_is_not_taken_for_done(loop_ext4: Loop,
                                                       tmp_path: Path) -> None:
    """A record without the handoff (prepare killed part-way) must not make a second
    prepare report the device ready; release clears it."""
    state = StateDir(str(tmp_path / "state"))
    with mounted(loop_ext4.node, tmp_path / "m") as mnt:
        stale = {"kind": "flush", "device": loop_ext4.name, "bdi": "7:0", "dirty_bytes": 0,
                 "filesystems": [], "nodes": [loop_ext4.node]}
        state.save(Record(loop_ext4.name, None, 0.0, (stale,)))
        with pytest.raises(DeviceBusy, match="stopped part-way"):
            _prepare(loop_ext4, state)
        assert _is_mounted(loop_ext4.node, mnt)
        roots = Roots.host()
        out = release(roots, loop_ext4.name, Policy.from_text(UNMOUNT), Runner(), state)
        assert out.ok, out.as_json()
        assert state.load(loop_ext4.name) is None
        assert json.dumps(_prepare(loop_ext4, state).as_json())  # goes ahead now
        assert not _is_mounted(loop_ext4.node, mnt)
        back = release(roots, loop_ext4.name, Policy.from_text(UNMOUNT), Runner(), state)
        assert back.ok and _is_mounted(loop_ext4.node, mnt)
