"""Pure inspection over built sysfs/procfs trees: resolution, holders, mounts, dirty data."""

from __future__ import annotations

from pathlib import Path

import pytest

from safeusb.errors import AmbiguousSelector, NoSuchDevice, SelectorError
from safeusb.handover.plan import build_plan
from safeusb.handover.policy import Settings
from safeusb.host.selector import Selector, resolve
from safeusb.host.snapshot import read_snapshot
from safeusb.inspect.decide import inspect
from safeusb.inspect.report import as_json, as_text
from tests.unit.fakesys import LINUX_NS, ROOT_MOUNT, FakeSystem, mount_line


@pytest.fixture
def fake(tmp_path: Path) -> FakeSystem:
    fs = FakeSystem(tmp_path)
    usb = fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    sda = fs.disk(usb, "sda", 8, 0)
    sda1 = fs.partition(sda, "sda1", 8, 1)
    fs.partition(sda, "sda2", 8, 2)
    fs.dm("dm-0", 0, "luks-1234", "CRYPT-LUKS2-1234-luks-1234", sda1)
    fs.virtual_disk("vda", 254, 16)
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    return fs


def _findings(fs: FakeSystem, selector: str = "2-1"):  # type: ignore[no-untyped-def]
    target = resolve(Selector.from_string(selector), fs.roots)
    return inspect(read_snapshot(fs.roots, target))


def test_selectors_resolve_to_the_same_device(fake: FakeSystem) -> None:
    for text in ("2-1", "2:3", "002:003", "46f4:0001", "46F4:0001"):
        target = resolve(Selector.from_string(text), fake.roots)
        assert target.usb is not None and target.usb.sysname == "2-1", text


def test_selector_errors(fake: FakeSystem) -> None:
    with pytest.raises(NoSuchDevice):
        resolve(Selector.from_string("dead:beef"), fake.roots)
    with pytest.raises(NoSuchDevice):
        resolve(Selector.from_string("9-9"), fake.roots)
    with pytest.raises(SelectorError):
        Selector.from_string("sda")
    fake.usb_device("2-2", 0x46F4, 0x0001, busnum=2, devnum=4, serial="STICK2")
    with pytest.raises(AmbiguousSelector) as exc:
        resolve(Selector.from_string("46f4:0001"), fake.roots)
    assert len(exc.value.candidates) == 2 and "STICK2" in str(exc.value)


def test_holder_graph_and_nodes(fake: FakeSystem) -> None:
    f = _findings(fake)
    assert sorted(f.snapshot.blocks) == ["dm-0", "sda", "sda1", "sda2"]
    assert {n.path for n in f.snapshot.nodes} >= {"/dev/sda", "/dev/sda1", "/dev/bus/usb/002/003"}
    (holder,) = [r for r in f.reasons if r.kind == "holder"]
    assert holder.text == "dm-crypt mapping /dev/dm-0 (luks-1234) is built on /dev/sda1"
    assert not f.free


def test_idle_device_is_free(tmp_path: Path) -> None:
    fs = FakeSystem(tmp_path)
    usb = fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    fs.disk(usb, "sda", 8, 0)
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    f = _findings(fs)
    assert f.free, as_text(f)
    assert "can be handed over now" in as_text(f)
    doc = as_json(f)
    assert doc["free"] is True and doc["device"]["vendor_id"] == "46f4"
    assert doc["block_devices"][0]["dirty_bytes"] == 0


def test_mounts_in_two_namespaces_and_dirty(fake: FakeSystem) -> None:
    fake.process(812, "nginx", 4026532300,
                 ROOT_MOUNT + mount_line(300, "254:0", "/srv/photos", "/dev/mapper/luks-1234"))
    fake.process(900, "bash", LINUX_NS, ROOT_MOUNT)
    fake.process(901, "sh", 4026532301,
                 ROOT_MOUNT + mount_line(400, "8:2", "/media/my\\040stick", "/dev/sda2", "vfat"))
    fake.bdi(8, 0, 4096, 0)
    f = _findings(fake)
    texts = [r.text for r in f.reasons]
    assert ("/dev/dm-0 mounted at /srv/photos in mount namespace 4026532300 (pid 812 nginx)"
            in texts)
    assert ("/dev/sda2 mounted at /media/my stick in mount namespace 4026532301 (pid 901 sh)"
            in texts)
    assert "4.0 MiB dirty, 0 B under writeback on sda" in texts
    doc = as_json(f)
    sda = next(b for b in doc["block_devices"] if b["name"] == "sda")
    assert sda["dirty_bytes"] == 4 * 1024 * 1024 and sda["writeback_bytes"] == 0


def test_btrfs_style_anonymous_device_matched_by_source(fake: FakeSystem) -> None:
    fake.process(5, "sh", 4026532302,
                 ROOT_MOUNT + mount_line(500, "0:45", "/data", "/dev/sda2", "btrfs"))
    f = _findings(fake)
    (m,) = [r for r in f.reasons if r.kind == "mount"]
    assert m.details.device == "sda2" and m.details.mountpoint == "/data"
    assert (0, 45) in f.snapshot.fs_devices


def test_swap_partition(fake: FakeSystem) -> None:
    fake.swaps("/dev/sda2                               partition\t1048572\t\t2048\t\t-2\n")
    (s,) = [r for r in _findings(fake).reasons if r.kind == "swap"]
    assert s.text == "/dev/sda2 is active swap (2.0 MiB in use)"


@pytest.mark.hostile
def test_unreadable_dirty_figures_fail_closed(tmp_path: Path) -> None:
    fs = FakeSystem(tmp_path)
    usb = fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    fs.disk(usb, "sda", 8, 0)
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    (fs.root / "debug/bdi/8:0/stats").unlink()
    f = _findings(fs)
    assert not f.free
    (r,) = f.reasons
    assert r.kind == "unreadable" and "may hold unwritten data" in r.text
    assert as_json(f)["block_devices"][0]["dirty_bytes"] is None


@pytest.mark.hostile
def test_garbled_mountinfo_fails_closed(fake: FakeSystem) -> None:
    fake.process(7, "x", 4026532399, "this is not mountinfo\n")
    f = _findings(fake)
    assert any(r.kind == "unreadable" and "4026532399" in r.text for r in f.reasons)


def test_namespace_pinned_without_process_fails_closed(fake: FakeSystem) -> None:
    pin = "600 21 0:4 mnt:[4026532777] /run/pinned rw - nsfs nsfs rw\n"
    fake.process(8, "y", 4026532398, ROOT_MOUNT + pin)
    f = _findings(fake)
    assert any(r.kind == "unreadable" and "4026532777" in r.text for r in f.reasons)


def _one_disk(tmp_path: Path, dirty_kib: int, writeback_kib: int = 0) -> FakeSystem:
    fs = FakeSystem(tmp_path)
    usb = fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    fs.disk(usb, "sda", 8, 0)
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    (fs.sys / "devices/system/cpu").mkdir(parents=True)
    (fs.sys / "devices/system/cpu/possible").write_text("0-1\n")
    fs.bdi(8, 0, dirty_kib, writeback_kib)
    return fs


def test_counter_drift_on_an_unopened_device_is_a_note(tmp_path: Path) -> None:
    f = _findings(_one_disk(tmp_path, 8, 20))
    assert f.snapshot.counter_slack_bytes == 128 * 1024
    assert f.free and len(f.notes) == 1 and "counter error" in f.notes[0]


def test_dirty_beyond_counter_error_is_a_reason(tmp_path: Path) -> None:
    f = _findings(_one_disk(tmp_path, 4096))
    assert [r.kind for r in f.reasons] == ["dirty"]


def test_small_dirty_figure_on_a_used_device_is_a_reason(tmp_path: Path) -> None:
    fs = _one_disk(tmp_path, 8)
    fs.process(50, "sh", 4026532500, ROOT_MOUNT + mount_line(300, "8:0", "/mnt", "/dev/sda"))
    f = _findings(fs)
    assert sorted(r.kind for r in f.reasons) == ["dirty", "mount"]


def test_foreign_mount_on_top_is_refused(fake: FakeSystem) -> None:
    mounts = (ROOT_MOUNT + mount_line(300, "8:2", "/media/stick", "/dev/sda2")
              + "301 300 0:50 / /media/stick/cache rw - tmpfs tmpfs rw\n")
    fake.process(50, "sh", 4026532600, mounts)
    f = _findings(fake)
    (sub,) = [r for r in f.reasons if r.kind == "submount"]
    assert sub.text.startswith("tmpfs tmpfs is mounted at /media/stick/cache, on top of "
                               "/dev/sda2 (mounted at /media/stick)")
    plan = build_plan(f, Settings(mount="unmount", holder="unmount"), "test")
    assert any("unmount it first" in r for r in plan.refusals)
