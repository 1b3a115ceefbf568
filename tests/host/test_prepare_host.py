"""prepare and release against real host kernel objects: loop devices stand in for sticks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from safeusb.handover.policy import Policy
from safeusb.handover.transaction import prepare, release
from safeusb.host.journal import StateDir
from safeusb.host.roots import Roots
from safeusb.host.runner import Runner, StepFailed
from safeusb.host.selector import Selector, resolve
from tests.host.conftest import Loop, background, run, wait_for

pytestmark = pytest.mark.host

UNMOUNT = '[defaults]\nmount = "unmount"\nswap = "unmount"\nholder = "unmount"\n'


def _ns_mount(loop: Loop, mnt: Path, payload: bytes | None = None) -> list[str]:
    """argv of a process that mounts the loop device in a private namespace and stays."""
    mnt.mkdir(parents=True, exist_ok=True)
    script = f"mount {loop.node} {mnt} && "
    if payload is not None:
        script += f"cat > {mnt}/data.bin && "
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script + "exec sleep 600"]


def _mounted_in(pid: int, mnt: Path) -> bool:
    return f" {mnt} " in Path(f"/proc/{pid}/mountinfo").read_text()


@pytest.fixture
def cli(safeusb_cmd: list[str], tmp_path: Path):  # type: ignore[no-untyped-def]
    state = tmp_path / "state"

    def _cli(*args: str) -> subprocess.CompletedProcess[str]:
        extra = ["--state-dir", str(state)] if args[0] in ("prepare", "release") else []
        p = subprocess.run([*safeusb_cmd, *args, *extra],
                           capture_output=True, text=True, timeout=120)
        assert "Traceback" not in p.stderr, p.stderr
        return p

    return _cli


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    p = tmp_path / "policy.toml"
    p.write_text(UNMOUNT)
    return p


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_refuse_policy_changes_nothing(cli, loop_ext4: Loop, tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    with background(_ns_mount(loop_ext4, mnt)) as proc:
        wait_for(lambda: _mounted_in(proc.pid, mnt))
        p = cli("prepare", loop_ext4.node, "--policy", str(tmp_path / "none.toml"))
        assert p.returncode == 1
        assert "no such file" in p.stderr  # an explicit policy file must exist
        default = tmp_path / "refuse.toml"
        default.write_text("[defaults]\n")
        p = cli("prepare", loop_ext4.node, "--policy", str(default))
        assert p.returncode == 1
        assert f"mounted at {mnt}" in p.stderr and 'set mount = "unmount"' in p.stderr
        assert _mounted_in(proc.pid, mnt)


def test_dry_run_prints_plan_and_changes_nothing(cli, loop_ext4: Loop, tmp_path: Path,
                                                  policy_file: Path) -> None:
    mnt = tmp_path / "m"
    with background(_ns_mount(loop_ext4, mnt)) as proc:
        wait_for(lambda: _mounted_in(proc.pid, mnt))
        p = cli("prepare", loop_ext4.node, "--policy", str(policy_file), "--dry-run", "--json")
        assert p.returncode == 0, p.stderr
        steps = [s["kind"] for s in json.loads(p.stdout)["steps"]]
        assert steps == ["flush", "unmount", "handoff"]
        assert _mounted_in(proc.pid, mnt)
        assert not (tmp_path / "state" / f"{loop_ext4.name}.json").exists()


def test_prepare_flushes_unmounts_in_namespace_and_release_remounts(
    cli, loop_ext4: Loop, tmp_path: Path, policy_file: Path
) -> None:
    saved = Path("/proc/sys/vm/dirty_writeback_centisecs").read_text()
    Path("/proc/sys/vm/dirty_writeback_centisecs").write_text("0")
    payload = os.urandom(4 * 1024 * 1024)
    mnt = tmp_path / "m"
    try:
        with background(_ns_mount(loop_ext4, mnt, payload), stdin=subprocess.PIPE) as proc:
            assert proc.stdin is not None
            proc.stdin.write(payload)
            proc.stdin.close()
            wait_for(lambda: _mounted_in(proc.pid, mnt))
            ins = cli("inspect", loop_ext4.node, "--json")
            dirty = json.loads(ins.stdout)["dirty"][0]["dirty_bytes"]
            assert dirty >= 1024 * 1024, ins.stdout
            p = cli("prepare", loop_ext4.node, "--policy", str(policy_file), "--json")
            assert p.returncode == 0, p.stderr
            out = json.loads(p.stdout)
            assert out["ok"] and [d.split()[0] for d in out["done"]] == [
                "flush", "unmount", "hold"]
            assert not _mounted_in(proc.pid, mnt)
            # Nothing uses it now; the data reached the device.
            assert cli("inspect", loop_ext4.node).returncode == 0
            state = tmp_path / "state" / f"{loop_ext4.name}.json"
            assert state.stat().st_mode & 0o777 == 0o600
            check = tmp_path / "check"
            check.mkdir()
            run("mount", "-o", "ro", loop_ext4.node, str(check))
            try:
                assert _sha(check / "data.bin") == hashlib.sha256(payload).hexdigest()
            finally:
                run("umount", str(check))
            r = cli("release", loop_ext4.node, "--policy", str(policy_file))
            assert r.returncode == 0, r.stderr
            assert _mounted_in(proc.pid, mnt)
            assert not state.exists()
            again = cli("release", loop_ext4.node, "--policy", str(policy_file))
            assert again.returncode == 0 and "nothing to release" in again.stdout
    finally:
        Path("/proc/sys/vm/dirty_writeback_centisecs").write_text(saved)


class _FailSecondUnmount(Runner):
    def __init__(self) -> None:
        super().__init__()
        self.unmounts = 0

    def umount_in(self, pid: int, mnt_ns: int, mountpoint: str) -> None:
        self.unmounts += 1
        if self.unmounts == 2:
            raise StepFailed(f"umount {mountpoint}: Device or resource busy")
        super().umount_in(pid, mnt_ns, mountpoint)


@pytest.mark.fault
def test_failed_step_rolls_back(loop_ext4: Loop, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with background(_ns_mount(loop_ext4, a)) as pa, background(_ns_mount(loop_ext4, b)) as pb:
        wait_for(lambda: _mounted_in(pa.pid, a) and _mounted_in(pb.pid, b))
        roots = Roots.host()
        target = resolve(Selector.from_string(loop_ext4.node), roots)
        runner = _FailSecondUnmount()
        outcome = prepare(roots, target, Policy.from_text(UNMOUNT), runner,
                          StateDir(str(tmp_path / "state")))
        assert not outcome.ok and "busy" in (outcome.error or "")
        assert len(outcome.undone) == 1 and outcome.not_undone == []
        assert outcome.host_state() == "as before: every step was undone"
        assert _mounted_in(pa.pid, a) and _mounted_in(pb.pid, b)
        assert not (tmp_path / "state" / f"{loop_ext4.name}.json").exists()


@contextlib.contextmanager
def stalled_mount(loop: Loop, tmp_path: Path) -> Iterator[tuple[Loop, Path, int]]:
    """A device whose writes cannot complete: a loop device backed by a file on a frozen
    filesystem, mounted in a private namespace with 2 MiB unwritten. Yields the device,
    its mountpoint and the pid holding the namespace; thaws and cleans up after."""
    outer = tmp_path / "outer"
    run("mount", loop.node, str(outer.mkdir() or outer))
    inner_img = outer / "inner.img"
    with open(inner_img, "wb") as f:
        f.truncate(32 * 1024 * 1024)
    run("mkfs.ext4", "-q", "-F", str(inner_img))
    inner = Loop(run("losetup", "--find", "--show", str(inner_img)).stdout.strip(), inner_img)
    saved = Path("/proc/sys/vm/dirty_writeback_centisecs").read_text()
    Path("/proc/sys/vm/dirty_writeback_centisecs").write_text("0")
    mnt = tmp_path / "m"
    try:
        with background(_ns_mount(inner, mnt, b""), stdin=subprocess.PIPE) as proc:
            assert proc.stdin is not None
            proc.stdin.write(os.urandom(2 * 1024 * 1024))
            proc.stdin.close()
            wait_for(lambda: _mounted_in(proc.pid, mnt))
            run("fsfreeze", "--freeze", str(outer))
            try:
                yield inner, mnt, proc.pid
            finally:
                run("fsfreeze", "--unfreeze", str(outer))
    finally:
        Path("/proc/sys/vm/dirty_writeback_centisecs").write_text(saved)
        run("losetup", "-d", inner.node, check=False)
        # The stalled sync lets go of the inner device once thawed: retry for a while.
        wait_for(lambda: run("umount", str(outer), check=False).returncode == 0, 20)


@pytest.mark.fault
def test_flush_timeout_refuses_and_leaves_it_mounted(loop_ext4: Loop, tmp_path: Path) -> None:
    """The flush of a device whose writes cannot complete times out; nothing is
    unmounted."""
    with stalled_mount(loop_ext4, tmp_path) as (inner, mnt, pid):
        roots = Roots.host()
        target = resolve(Selector.from_string(inner.node), roots)
        outcome = prepare(roots, target, Policy.from_text(UNMOUNT), Runner(),
                          StateDir(str(tmp_path / "state")), timeout=1.0)
        assert not outcome.ok
        assert "did not finish in 1 s" in (outcome.error or ""), outcome
        assert outcome.host_state() == "unchanged: nothing was done"
        assert _mounted_in(pid, mnt)


@pytest.mark.race
def test_second_prepare_while_locked_is_refused(cli, loop_ext4: Loop, tmp_path: Path,
                                                policy_file: Path) -> None:
    state = StateDir(str(tmp_path / "state"))
    with state.lock(loop_ext4.name):
        p = cli("prepare", loop_ext4.node, "--policy", str(policy_file))
    assert p.returncode == 1 and "another safeusb" in p.stderr


@pytest.mark.race
def test_device_taken_by_another_domain(cli, loop_ext4: Loop, policy_file: Path) -> None:
    assert cli("prepare", loop_ext4.node, "--policy", str(policy_file),
               "--domain", "g1").returncode == 0
    p = cli("prepare", loop_ext4.node, "--policy", str(policy_file), "--domain", "g2")
    assert p.returncode == 1 and "in use by domain g1" in p.stderr
    assert cli("prepare", loop_ext4.node, "--policy", str(policy_file),
               "--domain", "g1").returncode == 0
    assert cli("release", loop_ext4.node, "--policy", str(policy_file)).returncode == 0


@pytest.mark.fault
def test_tampered_state_is_not_trusted(cli, loop_ext4: Loop, tmp_path: Path,
                                       policy_file: Path) -> None:
    assert cli("prepare", loop_ext4.node, "--policy", str(policy_file)).returncode == 0
    state = tmp_path / "state" / f"{loop_ext4.name}.json"
    state.chmod(0o644)
    p = cli("release", loop_ext4.node, "--policy", str(policy_file))
    assert p.returncode == 1 and "not trusted" in p.stderr
    state.chmod(0o600)
    target = tmp_path / "elsewhere.json"
    target.write_text(state.read_text())
    target.chmod(0o600)
    state.unlink()
    state.symlink_to(target)
    p = cli("release", loop_ext4.node, "--policy", str(policy_file))
    assert p.returncode == 1 and "symlink" in p.stderr


@pytest.mark.race
def test_mount_attempts_during_prepare_fail(loop_ext4: Loop, tmp_path: Path) -> None:
    """A program that keeps mounting the device while prepare runs never gets it, once
    prepare has taken its first hold; prepare finds and unmounts anything earlier."""
    mnt = tmp_path / "m"
    race = tmp_path / "race"
    race.mkdir()
    stop = threading.Event()
    successes: list[float] = []

    def racer() -> None:
        while not stop.is_set():
            if subprocess.run(["mount", loop_ext4.node, str(race)], capture_output=True,
                              check=False).returncode == 0:
                successes.append(1)
                subprocess.run(["umount", str(race)], check=False)

    with background(_ns_mount(loop_ext4, mnt)) as proc:
        wait_for(lambda: _mounted_in(proc.pid, mnt))
        roots = Roots.host()
        target = resolve(Selector.from_string(loop_ext4.node), roots)
        runner = Runner()
        thread = threading.Thread(target=racer)
        held_from = 0
        thread.start()
        try:
            # Hold the device as prepare does, then count only attempts after the hold.
            original = runner.hold

            def hold(paths):  # type: ignore[no-untyped-def]
                nonlocal held_from
                busy = original(paths)
                if not busy and not held_from:
                    held_from = len(successes) or -1
                return busy

            # The hold ends where the handoff lets go of it (a loop device stays on the
            # host): mounts from then on are the racer's right.
            released = runner.release_holds
            held_until: int | None = None

            def release_holds():  # type: ignore[no-untyped-def]
                nonlocal held_until
                if held_until is None:
                    held_until = len(successes)
                released()

            runner.hold = hold  # type: ignore[method-assign]
            runner.release_holds = release_holds  # type: ignore[method-assign]
            outcome = prepare(roots, target, Policy.from_text(UNMOUNT), runner,
                              StateDir(str(tmp_path / "state")))
            ended = len(successes) if held_until is None else held_until
            after_hold = ended - max(held_from, 0)
            stop.set()
        finally:
            stop.set()
            thread.join()
            subprocess.run(["umount", str(race)], capture_output=True, check=False)
        # Either it was handed over with no mount getting in after the first hold, or the
        # racer was seen (in use at inspection, or claiming it before the hold) and refused.
        assert (outcome.ok or (outcome.plan is not None and outcome.plan.refused)
                or "claimed by another holder" in (outcome.error or "")), outcome
        if outcome.ok:
            assert held_from and after_hold == 0
        else:
            assert not outcome.host_state().startswith("changed"), outcome.host_state()


class _OwnerUnmountsFirst(Runner):
    """The mount's owner unmounts it between the snapshot and prepare's unmount; the
    first look still sees it (as when the owner is quicker than the look)."""

    looks = 0

    def _still_mounted(self, pid: int, mountpoint: str) -> bool:
        self.looks += 1
        if self.looks == 1:
            run("umount", mountpoint)
            return True  # the stale look: umount2 then finds nothing there (EINVAL)
        return super()._still_mounted(pid, mountpoint)


class _MountedAgainMeanwhile(Runner):
    """Another program unmounts and mounts the device again between prepare's look and
    its umount2: the call finds no mount (EINVAL), the next look finds a new one."""

    looks = 0

    def _still_mounted(self, pid: int, mountpoint: str) -> bool:
        self.looks += 1
        if self.looks == 1:
            run("umount", mountpoint)
            return True
        if self.looks == 2:  # after the failed umount2: somebody mounted it again
            run("mount", self.node, mountpoint)
        return super()._still_mounted(pid, mountpoint)

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node


@pytest.mark.race
def test_mount_made_again_meanwhile_is_a_claim_not_an_errno(loop_ext4: Loop,
                                                            tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    run("mount", loop_ext4.node, str(mnt))
    try:
        roots = Roots.host()
        target = resolve(Selector.from_string(loop_ext4.node), roots)
        outcome = prepare(roots, target, Policy.from_text(UNMOUNT),
                          _MountedAgainMeanwhile(loop_ext4.node),
                          StateDir(str(tmp_path / "state")))
        assert not outcome.ok
        assert "mounted again while prepare ran: claimed by another holder" in \
            (outcome.error or ""), outcome.error
        assert not outcome.host_state().startswith("changed"), outcome.host_state()
    finally:
        run("umount", str(mnt), check=False)


@pytest.mark.race
def test_mount_gone_meanwhile_is_neither_an_error_nor_put_back(loop_ext4: Loop,
                                                               tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    run("mount", loop_ext4.node, str(mnt))
    try:
        roots = Roots.host()
        target = resolve(Selector.from_string(loop_ext4.node), roots)
        state = StateDir(str(tmp_path / "state"))
        outcome = prepare(roots, target, Policy.from_text(UNMOUNT), _OwnerUnmountsFirst(),
                          state)
        assert outcome.ok, outcome.why_not()
        assert not any(d.startswith("unmount") for d in outcome.done), outcome.done
        assert any("was unmounted meanwhile" in n for n in outcome.notes), outcome.notes
        back = release(roots, loop_ext4.name, Policy.from_text(UNMOUNT), Runner(), state)
        assert back.ok and back.host_state() == "given back", back.as_json()
        assert f" {mnt} " not in Path("/proc/self/mountinfo").read_text()
    finally:
        run("umount", str(mnt), check=False)


def test_prepare_on_a_guard_refusal_marks_its_record(loop_ext4: Loop, tmp_path: Path) -> None:
    """The record of a device prepared because the kernel guard refused a program it says
    so (safeusbd follows it by the stricter rule); every other prepare's does not."""
    roots = Roots.host()
    target = resolve(Selector.from_string(loop_ext4.node), roots)
    state = StateDir(str(tmp_path / "state"))
    for after_refusal in (False, True):
        outcome = prepare(roots, target, Policy.from_text(UNMOUNT), Runner(), state,
                          after_refusal=after_refusal)
        assert outcome.ok, outcome
        record = state.load(loop_ext4.name)
        assert record is not None and record.after_refusal is after_refusal
        raw = json.loads((tmp_path / "state" / f"{loop_ext4.name}.json").read_text())
        assert raw.get("after_refusal", False) is after_refusal
        assert release(roots, loop_ext4.name, Policy.from_text(UNMOUNT), Runner(), state).ok
        assert state.load(loop_ext4.name) is None
