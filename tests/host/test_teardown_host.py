"""The teardown steps on real kernel objects: ending processes (kill = true), detaching
loop devices backed by files on the device, and stopping md arrays built on it.

Each test writes files with known checksums first, goes through the real prepare and
release, and ends by reading them back and running ``e2fsck -fn`` on the unmounted device.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from safeusb.handover.policy import Policy
from safeusb.handover.transaction import prepare, release
from safeusb.host.journal import StateDir
from safeusb.host.roots import Roots
from safeusb.host.runner import Runner
from safeusb.host.selector import Selector, resolve
from tests.conftest import require_root
from tests.host.conftest import Loop, run, wait_for

pytestmark = pytest.mark.host

MIB = 1024 * 1024
TEARDOWN = '[defaults]\nmount = "unmount"\nholder = "unmount"\n'
KILL = '[defaults]\nmount = "unmount"\nopen = "force"\nkill = true\n'
NO_KILL = '[defaults]\nmount = "unmount"\nopen = "force"\nkill = false\n'


@pytest.fixture
def cli(safeusb_cmd: list[str], tmp_path: Path):  # type: ignore[no-untyped-def]
    state = tmp_path / "state"

    def _cli(*args: str, policy: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = ["--state-dir", str(state)] if args[0] in ("prepare", "release") else []
        if policy is not None:
            path = tmp_path / f"policy-{hashlib.sha256(policy.encode()).hexdigest()[:8]}.toml"
            path.write_text(policy)
            extra += ["--policy", str(path)]
        p = subprocess.run([*safeusb_cmd, *args, *extra],
                           capture_output=True, text=True, timeout=120)
        assert "Traceback" not in p.stderr, p.stderr
        return p

    return _cli


def _mountpoints() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def _mounted(where: Path) -> bool:
    return str(where) in _mountpoints()


def _mount(node: str, where: Path, *options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    run("mount", *options, node, str(where))


def _umount_if_mounted(where: Path) -> None:
    """Cleanup: unmount, waiting for a busy mount to be let go of."""
    if _mounted(where):
        wait_for(lambda: run("umount", str(where), check=False).returncode == 0
                 or not _mounted(where))


def _write_files(where: Path, big: int = 4 * MIB) -> dict[str, str]:
    """Write files (not synced) and return their checksums by relative path."""
    files = {"data.bin": os.urandom(big), "sub/notes.txt": b"written before prepare\n" * 100}
    for rel, content in files.items():
        (where / rel).parent.mkdir(parents=True, exist_ok=True)
        (where / rel).write_bytes(content)
    return {rel: hashlib.sha256(content).hexdigest() for rel, content in files.items()}


def _read_sums(where: Path, sums: dict[str, str]) -> dict[str, str]:
    return {rel: hashlib.sha256((where / rel).read_bytes()).hexdigest() for rel in sums}


def _fsck_clean(node: str) -> None:
    p = run("e2fsck", "-fn", node, check=False)
    assert p.returncode == 0, f"e2fsck -fn {node}: exit {p.returncode}\n{p.stdout}{p.stderr}"


def _check_on_device(node: str, where: Path, sums: dict[str, str]) -> None:
    """The data reached the device: mount it read-only, compare, unmount, fsck."""
    _mount(node, where, "-o", "ro")
    try:
        assert _read_sums(where, sums) == sums
    finally:
        run("umount", str(where))
    _fsck_clean(node)


def _kinds(prepared: subprocess.CompletedProcess[str]) -> list[str]:
    return [s["kind"] for s in json.loads(prepared.stdout)["steps"]]


# ------------------------------------------------------------------------ kill = true


def _reaped(proc: subprocess.Popen[bytes]) -> threading.Thread:
    """Reap the process as soon as it exits, as a parent would: an unreaped child stays a
    zombie, which still answers signal 0."""
    t = threading.Thread(target=proc.wait, daemon=True)
    t.start()
    return t


def test_kill_ends_processes_with_files_on_it_then_unmounts(
    cli, loop_ext4: Loop, tmp_path: Path
) -> None:
    mnt = tmp_path / "m"
    _mount(loop_ext4.node, mnt)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sums = _write_files(mnt)
        with open(mnt / "data.bin", "rb") as held:  # the child keeps it as its stdin
            procs.append(subprocess.Popen(["sleep", "600"], stdin=held))
        procs.append(subprocess.Popen(["sleep", "600"], cwd=mnt, stdin=subprocess.DEVNULL))
        reapers = [_reaped(p) for p in procs]
        assert os.readlink(f"/proc/{procs[0].pid}/fd/0") == str(mnt / "data.bin")
        assert os.readlink(f"/proc/{procs[1].pid}/cwd") == str(mnt)

        # Without kill = true, processes with files on it keep it busy: refused, untouched.
        p = cli("prepare", loop_ext4.node, policy=NO_KILL)
        assert p.returncode == 1, p.stderr
        for proc in procs:
            assert f"pid {proc.pid} (sleep) uses {loop_ext4.node}" in p.stderr
        assert p.stderr.count("set kill = true") == 2, p.stderr
        assert all(proc.poll() is None for proc in procs) and _mounted(mnt)
        assert not (tmp_path / "state" / f"{loop_ext4.name}.json").exists()

        p = cli("prepare", loop_ext4.node, "--json", policy=KILL)
        assert p.returncode == 0, p.stderr
        assert _kinds(p) == ["kill", "kill", "flush", "unmount", "handoff"], p.stdout
        for t in reapers:
            t.join(timeout=10)
        # Ended by SIGTERM (the first signal), not by SIGKILL.
        assert [proc.returncode for proc in procs] == [-signal.SIGTERM] * 2
        assert not _mounted(mnt)
        assert cli("inspect", loop_ext4.node).returncode == 0
        _check_on_device(loop_ext4.node, tmp_path / "check", sums)

        r = cli("release", loop_ext4.node, policy=KILL)
        assert r.returncode == 0, r.stderr
        assert _mounted(mnt)
        assert _read_sums(mnt, sums) == sums
        run("umount", str(mnt))
        _fsck_clean(loop_ext4.node)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        _umount_if_mounted(mnt)


class _ShortGrace(Runner):
    """The real runner, with a grace of half a second between SIGTERM and SIGKILL."""

    def kill(self, pid: int, comm: str, grace: float = 5.0, after_kill: float = 5.0) -> None:
        super().kill(pid, comm, grace=0.5, after_kill=after_kill)


def test_a_process_nobody_reaps_counts_as_ended(loop_ext4: Loop, tmp_path: Path) -> None:
    """A process that exits on SIGTERM but is not reaped by its parent (this test, which
    does not wait) is a zombie: its files are closed, so it is ended; no SIGKILL."""
    mnt = tmp_path / "m"
    _mount(loop_ext4.node, mnt)
    proc: subprocess.Popen[bytes] | None = None
    try:
        sums = _write_files(mnt)
        with open(mnt / "data.bin", "rb") as held:
            proc = subprocess.Popen(["sleep", "600"], stdin=held)
        roots = Roots.host()
        target = resolve(Selector.from_string(loop_ext4.node), roots)
        state = StateDir(str(tmp_path / "state"))
        runner = Runner()
        outcome = prepare(roots, target, Policy.from_text(KILL), runner, state)
        assert outcome.ok, outcome.why_not()
        assert Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] == "Z"
        assert not any("SIGKILL" in line and "still there" in line
                       for line in runner.log_lines), runner.log_lines
        _check_on_device(loop_ext4.node, tmp_path / "check", sums)
        assert release(roots, loop_ext4.name, Policy.from_text(KILL), Runner(), state).ok
        assert _read_sums(mnt, sums) == sums
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        _umount_if_mounted(mnt)


def _ignores_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


def test_kill_ends_a_process_ignoring_sigterm_with_sigkill(loop_ext4: Loop,
                                                           tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    _mount(loop_ext4.node, mnt)
    proc: subprocess.Popen[bytes] | None = None
    try:
        sums = _write_files(mnt)
        saved = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited through exec
        try:
            with open(mnt / "data.bin", "rb") as held:
                proc = subprocess.Popen(["sleep", "600"], stdin=held)
        finally:
            signal.signal(signal.SIGTERM, saved)
        reaper = _reaped(proc)
        assert _ignores_sigterm(proc.pid)
        roots = Roots.host()
        target = resolve(Selector.from_string(loop_ext4.node), roots)
        state = StateDir(str(tmp_path / "state"))
        outcome = prepare(roots, target, Policy.from_text(KILL), _ShortGrace(), state)
        assert outcome.ok, outcome.why_not()
        assert outcome.done[0] == f"end pid {proc.pid} (sleep) (TERM, then KILL)"
        reaper.join(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        assert not _mounted(mnt)
        _check_on_device(loop_ext4.node, tmp_path / "check", sums)
        back = release(roots, loop_ext4.name, Policy.from_text(KILL), Runner(), state)
        assert back.ok, back.not_undone
        assert _mounted(mnt) and _read_sums(mnt, sums) == sums
        run("umount", str(mnt))
        _fsck_clean(loop_ext4.node)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        _umount_if_mounted(mnt)


# ------------------------------------------------------------------------ loop devices


def _loop_of(image: Path) -> str | None:
    """The loop device backed by image, if any."""
    for back in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if back.read_text().strip() == str(image):
                return f"/dev/{back.parent.parent.name}"
        except FileNotFoundError:
            continue  # detached meanwhile (another loop device)
    return None


def _loop_setup(node: str) -> dict[str, str]:
    base = Path("/sys/block") / os.path.basename(node)
    return {k: (base / k).read_text().strip()
            for k in ("loop/backing_file", "loop/offset", "loop/sizelimit", "loop/autoclear",
                      "ro")}


@pytest.fixture
def outer(loop_ext4: Loop, tmp_path: Path) -> Iterator[Path]:
    """The target mounted at tmp/outer; whatever the test leaves attached to or mounted
    from an image on it is taken down afterwards."""
    where = tmp_path / "outer"
    _mount(loop_ext4.node, where)
    try:
        yield where
    finally:
        _umount_if_mounted(tmp_path / "inner")
        for image in where.glob("*.img") if _mounted(where) else ():
            node = _loop_of(image)
            if node is not None:
                run("losetup", "-d", node, check=False)
        _umount_if_mounted(where)


INNER_SIZE = 16 * MIB
OFFSET = MIB


def _inner_image(outer: Path, offset: int = 0) -> Path:
    image = outer / "inner.img"
    with open(image, "wb") as f:
        f.truncate(offset + INNER_SIZE)
    if offset:
        node = run("losetup", "--find", "--show", "--offset", str(offset), "--sizelimit",
                   str(INNER_SIZE), str(image)).stdout.strip()
        run("mkfs.ext4", "-q", "-F", node)
        run("losetup", "-d", node)
    else:
        run("mkfs.ext4", "-q", "-F", str(image))
    return image


@pytest.mark.parametrize("setup", ["losetup", "mount-o-loop", "offset-read-only"])
def test_loop_backed_on_it_is_detached_and_attached_again(
    cli, loop_ext4: Loop, outer: Path, tmp_path: Path, setup: str
) -> None:
    """losetup: a plain loop device. mount -o loop: the loop device goes away by itself
    when its filesystem is unmounted (autoclear). offset-read-only: a filesystem 1 MiB into
    the file, attached read-only with a size limit: attached again the same way."""
    inner_mnt = tmp_path / "inner"
    offset = OFFSET if setup == "offset-read-only" else 0
    image = _inner_image(outer, offset)
    if setup == "mount-o-loop":
        _mount(str(image), inner_mnt, "-o", "loop")
        node = _loop_of(image)
        assert node is not None
        assert Path(f"/sys/block/{os.path.basename(node)}/loop/autoclear").read_text() == "1\n"
    else:
        node = run("losetup", "--find", "--show", "--offset", str(offset), "--sizelimit",
                   str(INNER_SIZE if offset else 0), str(image)).stdout.strip()
        _mount(node, inner_mnt)
    outer_sums = _write_files(outer)
    inner_sums = _write_files(inner_mnt, big=2 * MIB)
    if setup == "offset-read-only":  # written above; now attached read-only
        run("umount", str(inner_mnt))
        run("losetup", "-d", node)
        node = run("losetup", "--find", "--show", "--read-only", "--offset", str(offset),
                   "--sizelimit", str(INNER_SIZE), str(image)).stdout.strip()
        _mount(node, inner_mnt, "-o", "ro")
    before = _loop_setup(node)
    assert before["loop/backing_file"] == str(image)

    p = cli("prepare", loop_ext4.node, "--json", policy=TEARDOWN)
    assert p.returncode == 0, p.stderr
    steps = json.loads(p.stdout)["steps"]
    assert [s["kind"] for s in steps if s["kind"] != "flush"] == [
        "unmount", "detach-loop", "unmount", "handoff"], p.stdout
    assert [s["mountpoint"] for s in steps if s["kind"] == "unmount"] == [
        str(inner_mnt), str(outer)]
    assert not _mounted(inner_mnt) and not _mounted(outer)
    assert _loop_of(image) is None  # detached: nothing holds the image any more
    assert cli("inspect", loop_ext4.node).returncode == 0
    # What was written on both filesystems reached the target device.
    check = tmp_path / "check"
    _mount(loop_ext4.node, check, "-o", "ro")
    try:
        assert _read_sums(check, outer_sums) == outer_sums
        half = run("losetup", "--find", "--show", "--read-only", "--offset", str(offset),
                   str(check / "inner.img")).stdout.strip()
        try:
            _check_on_device(half, tmp_path / "check-inner", inner_sums)
        finally:
            run("losetup", "-d", half)
    finally:
        run("umount", str(check))
    _fsck_clean(loop_ext4.node)

    r = cli("release", loop_ext4.node, policy=TEARDOWN)
    assert r.returncode == 0, r.stderr
    assert _mounted(outer) and _mounted(inner_mnt)
    assert _loop_setup(node) == before  # the same device, file, offset, size and mode
    assert _read_sums(outer, outer_sums) == outer_sums
    assert _read_sums(inner_mnt, inner_sums) == inner_sums
    run("umount", str(inner_mnt))
    if setup == "mount-o-loop":  # autoclear kept: it went with its filesystem again
        assert _loop_of(image) is None
        _fsck_clean(str(image))
    else:
        _fsck_clean(node)
        run("losetup", "-d", node)
    run("umount", str(outer))
    _fsck_clean(loop_ext4.node)


def _nsenter(pid: int, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("nsenter", "--target", str(pid), "--mount", *argv, check=check)


def _mounted_in(pid: int, where: Path) -> bool:
    return any(line.split()[4] == str(where)
               for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines())


def test_loop_backed_on_it_in_a_private_mount_namespace(
    cli, loop_ext4: Loop, tmp_path: Path
) -> None:
    """The target, and an image on it attached and mounted, only inside a private mount
    namespace (a container's): the backing file's path means something only there."""
    outer, inner_mnt = tmp_path / "outer", tmp_path / "inner"
    outer.mkdir()
    inner_mnt.mkdir()
    own_ns = os.readlink("/proc/self/ns/mnt")
    with subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "600"]
                          ) as keeper:
        node: str | None = None
        try:
            pid = keeper.pid
            # Once sleep runs, unshare has made its namespace's mounts private.
            wait_for(lambda: os.readlink(f"/proc/{pid}/exe").endswith("/sleep"))
            assert os.readlink(f"/proc/{pid}/ns/mnt") != own_ns
            _nsenter(pid, "mount", loop_ext4.node, str(outer))
            inside = Path(f"/proc/{pid}/root{outer}")
            image = _inner_image(inside)
            node = _nsenter(pid, "losetup", "--find", "--show", str(outer / "inner.img")
                            ).stdout.strip()
            _nsenter(pid, "mount", node, str(inner_mnt))
            assert not _mounted(outer)  # not in this namespace
            outer_sums = _write_files(inside)
            inner_sums = _write_files(Path(f"/proc/{pid}/root{inner_mnt}"), big=2 * MIB)
            before = _loop_setup(node)

            p = cli("prepare", loop_ext4.node, "--json", policy=TEARDOWN)
            assert p.returncode == 0, p.stderr
            assert [k for k in _kinds(p) if k != "flush"] == [
                "unmount", "detach-loop", "unmount", "handoff"], p.stdout
            assert not _mounted_in(pid, inner_mnt) and not _mounted_in(pid, outer)
            assert not Path(f"/sys/block/{os.path.basename(node)}/loop").exists()
            check = tmp_path / "check"
            _mount(loop_ext4.node, check, "-o", "ro")
            try:
                assert _read_sums(check, outer_sums) == outer_sums
                assert image == inside / "inner.img"
                _check_on_device(str(check / "inner.img"), tmp_path / "check-inner",
                                 inner_sums)
            finally:
                run("umount", str(check))
            _fsck_clean(loop_ext4.node)

            r = cli("release", loop_ext4.node, policy=TEARDOWN)
            assert r.returncode == 0, r.stderr
            assert _mounted_in(pid, outer) and _mounted_in(pid, inner_mnt)
            assert _loop_setup(node) == before
            assert _read_sums(inside, outer_sums) == outer_sums
            assert _read_sums(Path(f"/proc/{pid}/root{inner_mnt}"), inner_sums) == inner_sums
            _nsenter(pid, "umount", str(inner_mnt))
            _fsck_clean(node)
            run("losetup", "-d", node)
            _nsenter(pid, "umount", str(outer))
            _fsck_clean(loop_ext4.node)
        finally:
            _nsenter(keeper.pid, "umount", str(inner_mnt), check=False)
            if node is not None and Path(f"/sys/block/{os.path.basename(node)}/loop").exists():
                run("losetup", "-d", node, check=False)
            _nsenter(keeper.pid, "umount", str(outer), check=False)
            keeper.kill()


def test_loop_backed_by_a_deleted_file_is_refused(
    cli, loop_ext4: Loop, outer: Path, tmp_path: Path
) -> None:
    """Its image is gone from the filesystem; the loop device is all that keeps the data:
    detaching it would destroy it."""
    image = _inner_image(outer)
    node = run("losetup", "--find", "--show", str(image)).stdout.strip()
    try:
        image.unlink()
        p = cli("prepare", loop_ext4.node, policy=TEARDOWN)
        assert p.returncode == 1, p.stderr
        assert f"loop device {node} is backed by {image}, a file already deleted" in p.stderr
        assert _mounted(outer)
        assert _loop_setup(node)["loop/backing_file"] == f"{image} (deleted)"
        _fsck_clean(node)  # still there, whole
    finally:
        run("losetup", "-d", node, check=False)


# ------------------------------------------------------------------------ md arrays


class MdArray:
    def __init__(self, name: str, members: list[Loop]) -> None:
        self.name = name  # unique; the array is /dev/md/NAME with a homehost of its own
        self.members = members

    def kernel_name(self) -> str | None:
        """The md device built on the first member (md127), if any."""
        holders = os.listdir(f"/sys/block/{self.members[0].name}/holders")
        return holders[0] if holders else None

    def holders(self) -> list[str]:
        return [h for m in self.members for h in os.listdir(f"/sys/block/{m.name}/holders")]


def _have_md() -> bool:
    if not Path("/proc/mdstat").exists():
        run("modprobe", "md_mod", check=False)
    return Path("/proc/mdstat").exists()


@pytest.fixture
def md_raid1(tmp_path: Path) -> Iterator[MdArray]:
    """A raid1 on two loop devices of its own, with ext4 on it. Stops whatever md array is
    left on its members and detaches them, whatever state the test leaves them in."""
    require_root()
    if not _have_md():
        pytest.skip("this kernel has no md driver (no /proc/mdstat; modprobe md_mod fails)")
    tag = f"safeusb-test-{uuid.uuid4().hex[:8]}"
    members: list[Loop] = []
    array = MdArray(tag, members)
    try:
        for i in range(2):
            image = tmp_path / f"member{i}.img"
            with open(image, "wb") as f:
                f.truncate(48 * MIB)
            members.append(Loop(run("losetup", "--find", "--show", str(image)).stdout.strip(),
                                image))
        run("mdadm", "--create", f"/dev/md/{tag}", "--metadata=1.2", "--level=1",
            "--raid-devices=2", "--run", "--assume-clean", f"--homehost={tag}",
            f"--name={tag}", *(m.node for m in members))
        md = array.kernel_name()
        assert md is not None and md.startswith("md"), os.listdir("/sys/block")
        run("mkfs.ext4", "-q", "-F", f"/dev/{md}")
        yield array
    finally:
        _umount_if_mounted(tmp_path / "md")
        for md in sorted(set(array.holders())):
            run("mdadm", "--stop", f"/dev/{md}", check=False)
        for m in members:
            run("losetup", "-d", m.node, check=False)
        Path(f"/dev/md/{tag}").unlink(missing_ok=True)


def _md_state(md: str) -> dict[str, str]:
    base = Path(f"/sys/block/{md}/md")
    return {k: (base / k).read_text().strip() for k in ("raid_disks", "degraded")}


def test_md_array_on_it_is_stopped_and_reassembled(
    cli, md_raid1: MdArray, tmp_path: Path
) -> None:
    md = md_raid1.kernel_name()
    assert md is not None
    target = md_raid1.members[0]
    mnt = tmp_path / "md"
    _mount(f"/dev/{md}", mnt)
    sums = _write_files(mnt)
    # Where each member keeps the filesystem, to read each half on its own afterwards.
    offsets = {m.name: int(Path(f"/sys/block/{md}/md/dev-{m.name}/offset").read_text()) * 512
               for m in md_raid1.members}
    size = int(Path(f"/sys/block/{md}/size").read_text()) * 512

    refused = cli("prepare", target.node, policy='[defaults]\nmount = "unmount"\n')
    assert refused.returncode == 1 and f"md RAID array /dev/{md} is built on " \
        f"{target.node}" in refused.stderr, refused.stderr
    assert _mounted(mnt) and md_raid1.holders() == [md, md]

    p = cli("prepare", target.node, "--json", policy=TEARDOWN)
    assert p.returncode == 0, p.stderr
    assert [k for k in _kinds(p) if k != "flush"] == ["unmount", "stop-md", "handoff"], p.stdout
    assert not _mounted(mnt)
    assert md_raid1.holders() == []  # stopped: both members are free
    assert f"{md} :" not in Path("/proc/mdstat").read_text()
    assert cli("inspect", target.node).returncode == 0
    # Each half of the mirror holds every byte written, and a clean filesystem.
    for m in md_raid1.members:
        half = run("losetup", "--find", "--show", "--read-only", "--offset",
                   str(offsets[m.name]), "--sizelimit", str(size), str(m.image)).stdout.strip()
        try:
            _check_on_device(half, tmp_path / f"check-{m.name}", sums)
        finally:
            run("losetup", "-d", half)

    r = cli("release", target.node, policy=TEARDOWN)
    assert r.returncode == 0, r.stderr
    assert md_raid1.holders() == [md, md]  # reassembled from both members, same name
    assert _md_state(md) == {"raid_disks": "2", "degraded": "0"}
    assert _mounted(mnt)
    assert _read_sums(mnt, sums) == sums
    run("umount", str(mnt))
    _fsck_clean(f"/dev/{md}")
