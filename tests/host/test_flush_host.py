"""The flush of a device with nothing mounted and nothing dirty when it was read: fsynced
by a thread of the process, with the same timeout and the same report as `sync`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from safeusb.host.runner import FlushTimeout, Runner, StepFailed
from tests.host.conftest import Loop, run, wait_for

pytestmark = pytest.mark.host

PATTERN = b"safeusb-flush-test" * 227  # 4086 bytes


@dataclass(frozen=True)
class Order:
    device: str
    bdi: str
    dirty_bytes: int = 0
    filesystems: tuple[tuple[int, str], ...] = ()
    nodes: tuple[str, ...] = ()


def order(loop: Loop) -> Order:
    st = os.stat(loop.node)
    return Order(loop.node, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}",
                 nodes=(loop.node,))


def write_unsynced(node: str) -> None:
    fd = os.open(node, os.O_WRONLY)
    try:
        os.pwrite(fd, PATTERN, 0)
    finally:
        os.close(fd)  # not the last close while ``hold`` keeps it open: nothing synced


@pytest.fixture
def no_background_writeback() -> object:
    knob = Path("/proc/sys/vm/dirty_writeback_centisecs")
    saved = knob.read_text()
    knob.write_text("0")
    yield
    knob.write_text(saved)


def test_idle_device_is_fsynced_in_process(loop_ext4: Loop, no_background_writeback: object,
                                           caplog: pytest.LogCaptureFixture) -> None:
    hold = os.open(loop_ext4.node, os.O_RDONLY)
    try:
        write_unsynced(loop_ext4.node)
        assert loop_ext4.image.read_bytes()[:len(PATTERN)] != PATTERN  # still in the cache
        with caplog.at_level(logging.INFO, logger="safeusb"):
            Runner().flush(order(loop_ext4))
        assert loop_ext4.image.read_bytes()[:len(PATTERN)] == PATTERN
        assert not [r for r in caplog.messages if r.startswith("run: ")], caplog.messages
    finally:
        os.close(hold)


@pytest.mark.fault
def test_idle_flush_that_cannot_finish_times_out_and_is_left_behind(
        loop_ext4: Loop, tmp_path: Path, no_background_writeback: object,
        caplog: pytest.LogCaptureFixture) -> None:
    """Its writes go to a file on a frozen filesystem: the fsync waits in the kernel."""
    outer = tmp_path / "outer"
    outer.mkdir()
    run("mount", loop_ext4.node, str(outer))
    inner_img = outer / "inner.img"
    with open(inner_img, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    inner = Loop(run("losetup", "--find", "--show", str(inner_img)).stdout.strip(), inner_img)
    hold = os.open(inner.node, os.O_RDONLY)
    try:
        write_unsynced(inner.node)
        run("fsfreeze", "--freeze", str(outer))
        try:
            runner = Runner()
            runner.flush_timeout = 1.0
            with caplog.at_level(logging.INFO, logger="safeusb"), \
                    pytest.raises(FlushTimeout, match="did not finish in 1 s"):
                runner.flush(order(inner))
            assert any(f"the fsync of {inner.node} is still waiting in the kernel" in m
                       for m in caplog.messages), caplog.messages
        finally:
            run("fsfreeze", "--unfreeze", str(outer))
    finally:
        os.close(hold)
        run("losetup", "-d", inner.node, check=False)
        wait_for(lambda: run("umount", str(outer), check=False).returncode == 0, 20)


def test_idle_flush_failure_names_the_node(tmp_path: Path, loop_ext4: Loop) -> None:
    bad = order(loop_ext4)
    bad = Order(bad.device, bad.bdi, nodes=(str(tmp_path / "no-such-node"),))
    with pytest.raises(StepFailed, match=r"fsync .*no-such-node: No such file"):
        Runner().flush(bad)
