"""Teardown plans for loop devices backed by files on the device, and for processes, over
built sysfs/procfs trees; and the DetachLoop step against a runner that only records."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from safeusb.handover.plan import build_plan
from safeusb.handover.policy import Settings
from safeusb.handover.steps import DetachLoop, Kill, Unmount, step_from_json
from safeusb.host.runner import Runner, StepFailed
from safeusb.host.selector import Selector, resolve
from safeusb.host.snapshot import read_snapshot
from safeusb.inspect.decide import inspect
from safeusb.reasons import Open, Reason, Use
from tests.unit.fakesys import LINUX_NS, ROOT_MOUNT, FakeSystem, mount_line

TEARDOWN = Settings(mount="unmount", holder="unmount")
CONTAINER_NS = 4026532700


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _loop(fs: FakeSystem, minor: int, backing: str, **attrs: str) -> Path:
    path = fs.virtual_disk(f"loop{minor}", 7, minor)
    values = {"loop/backing_file": backing, "loop/offset": "0", "loop/sizelimit": "0",
              "loop/partscan": "0", "loop/dio": "0", "loop/autoclear": "0", "ro": "0",
              "queue/logical_block_size": "512", **attrs}
    for name, value in values.items():
        _write(path / name, value + "\n")
    return path


@pytest.fixture
def stick(tmp_path: Path) -> FakeSystem:
    """A stick (sda1) mounted in a container's private mount namespace only, with an image
    on it attached as loop0 (set up 1 MiB in, read-only, 4 KiB sectors) and mounted there."""
    fs = FakeSystem(tmp_path)
    usb = fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    fs.partition(fs.disk(usb, "sda", 8, 0), "sda1", 8, 1)
    _loop(fs, 0, "/srv/stick/images/disk.img", **{
        "loop/offset": "1048576", "loop/sizelimit": "16777216", "ro": "1",
        "queue/logical_block_size": "4096"})
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    fs.process(700, "containerd-shim", CONTAINER_NS,
               ROOT_MOUNT + mount_line(300, "8:1", "/srv/stick", "/dev/sda1")
               + mount_line(301, "7:0", "/srv/disk", "/dev/loop0"))
    return fs


def _findings(fs: FakeSystem):  # type: ignore[no-untyped-def]
    target = resolve(Selector.from_string("2-1"), fs.roots)
    return inspect(read_snapshot(fs.roots, target))


def test_loop_backed_in_a_private_namespace_is_detached_with_its_setup(
    stick: FakeSystem,
) -> None:
    plan = build_plan(_findings(stick), TEARDOWN, "test")
    assert not plan.refused, plan.refusals
    teardown = [s for s in plan.steps if s.kind in ("unmount", "detach-loop")]
    assert [(s.kind, getattr(s, "mountpoint", None)) for s in teardown] == [
        ("unmount", "/srv/disk"), ("detach-loop", None), ("unmount", "/srv/stick")]
    (detach,) = [s for s in teardown if isinstance(s, DetachLoop)]
    assert detach == DetachLoop(
        "/dev/loop0", "/srv/stick/images/disk.img", offset=1048576, sizelimit=16777216,
        read_only=True, sector_size=4096, pid=700, mnt_ns=CONTAINER_NS)


def test_loop_backed_by_a_deleted_file_is_refused(tmp_path: Path) -> None:
    fs = FakeSystem(tmp_path)
    usb = fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    fs.disk(usb, "sda", 8, 0)
    _loop(fs, 0, "/media/stick/scratch.img (deleted)")
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT + mount_line(300, "8:0", "/media/stick",
                                                            "/dev/sda"))
    f = _findings(fs)
    assert f.snapshot.backed_loops == ("loop0",)
    plan = build_plan(f, TEARDOWN, "test")
    assert plan.refusals == (
        "loop device /dev/loop0 is backed by /media/stick/scratch.img, a file already "
        "deleted: detaching it would destroy what it holds; copy its contents off it and "
        "detach it yourself",)


def test_one_kill_per_process(stick: FakeSystem) -> None:
    f = _findings(stick)
    uses = [Reason(f"pid 42 (tar) uses {d}", Open(42, "tar", d, (Use("fd", "x"),)))
            for d in ("/dev/sda1", "/dev/loop0")]
    f = dataclasses.replace(f, reasons=(*f.reasons, *uses))
    plan = build_plan(f, dataclasses.replace(TEARDOWN, open="force", kill=True), "test")
    assert [s for s in plan.steps if isinstance(s, Kill)] == [Kill(42, "tar")]
    assert isinstance(plan.steps[-2], Unmount)


class _Recorder(Runner):
    """Records commands; losetup --detach takes the loop's sysfs attributes away when
    ``detaches`` is set, as the kernel does."""

    def __init__(self, sys_root: Path, detaches: bool = True) -> None:
        super().__init__(sys_root=str(sys_root))
        self.commands: list[list[str]] = []
        self.detaches = detaches

    def run(self, argv: Sequence[str], timeout: float | None = 120) -> str:
        self.commands.append([os.path.basename(argv[0]), *argv[1:]])
        if self.detaches and "--detach" in argv:
            (Path(self.sys_root) / "block" / os.path.basename(argv[-1]) / "loop"
             / "backing_file").unlink()
        return ""


@pytest.fixture
def sys_root(tmp_path: Path) -> Path:
    _write(tmp_path / "block/loop3/loop/backing_file", "/media/stick/disk.img\n")
    return tmp_path


def test_detach_then_attach_again_alike(sys_root: Path) -> None:
    own_ns = int(os.readlink("/proc/self/ns/mnt").removeprefix("mnt:[").rstrip("]"))
    step = DetachLoop("/dev/loop3", "/media/stick/disk.img", offset=512, sizelimit=4096,
                      read_only=True, partscan=True, direct_io=True, sector_size=4096,
                      pid=os.getpid(), mnt_ns=own_ns)
    runner = _Recorder(sys_root)
    step.execute(runner)
    assert runner.commands == [["losetup", "--detach", "/dev/loop3"]]
    step.undo(runner)
    assert runner.commands[1] == [
        "losetup", "--offset", "512", "--sizelimit", "4096", "--sector-size", "4096",
        "--read-only", "--partscan", "--direct-io=on", "/dev/loop3",
        f"/proc/{os.getpid()}/root/media/stick/disk.img"]
    # The state record round-trips, and an older record (node and file only) still loads.
    assert step_from_json(step.as_json()) == step
    old = step_from_json({"kind": "detach-loop", "text": "", "node": "/dev/loop3",
                          "backing_file": "/media/stick/disk.img"})
    old.undo(runner)
    assert runner.commands[2] == ["losetup", "/dev/loop3", "/media/stick/disk.img"]


def test_autoclear_loop_already_gone_is_not_detached_again(sys_root: Path) -> None:
    (sys_root / "block/loop3/loop/backing_file").unlink()  # gone with its unmount
    runner = _Recorder(sys_root)
    DetachLoop("/dev/loop3", "/media/stick/disk.img", autoclear=True).execute(runner)
    assert runner.commands == []


def test_loop_attached_to_another_file_is_left_alone(sys_root: Path) -> None:
    (sys_root / "block/loop3/loop/backing_file").write_text("/home/someone/else.img\n")
    runner = _Recorder(sys_root)
    with pytest.raises(StepFailed, match=r"now backed by /home/someone/else\.img"):
        DetachLoop("/dev/loop3", "/media/stick/disk.img").execute(runner)
    assert runner.commands == []


def test_deferred_detach_of_a_loop_still_open_fails_the_step(sys_root: Path) -> None:
    runner = _Recorder(sys_root, detaches=False)  # LOOP_CLR_FD only set autoclear
    with pytest.raises(StepFailed, match="still in use after losetup --detach"):
        DetachLoop("/dev/loop3", "/media/stick/disk.img").execute(runner)


def test_attach_again_refused_when_the_namespace_is_gone(sys_root: Path) -> None:
    (sys_root / "block/loop3/loop/backing_file").unlink()
    runner = _Recorder(sys_root)
    with pytest.raises(StepFailed, match="no longer in mount namespace 1"):
        DetachLoop("/dev/loop3", "/srv/x.img", pid=os.getpid(), mnt_ns=1).undo(runner)
    assert runner.commands == []


def test_every_step_kind_is_known_by_its_json_kind_and_kinds_are_unique() -> None:
    from dataclasses import dataclass  # noqa: PLC0415
    from typing import ClassVar  # noqa: PLC0415

    from safeusb.handover.steps import Step  # noqa: PLC0415

    assert sorted(Step.by_kind) == sorted([
        "kill", "flush", "unmount", "swapoff", "detach-loop", "close-crypt", "deactivate-lv",
        "stop-md", "remove-dm", "link-down", "handoff"])
    with pytest.raises(TypeError, match="two kinds of step are called 'unmount'"):
        @dataclass(frozen=True)
        class Twice(Step):
            kind: ClassVar[str] = "unmount"
    assert Step.by_kind["unmount"] is Unmount
