"""The in-kernel scan (BPF iterators, safeusb/host/bpfscan.py) against the /proc scan
(safeusb/host/procfs.py) on the same live kernel objects: a loop ext4 mounted on the host and
in a private mount namespace, and processes that hold it every way both look for (a
descriptor of a file, a memory map of a file whose descriptor was closed, a deleted file
still open, working directory, root directory, the block node held open, a character
node), compared field by field. And the comparison itself: an in-kernel scan that drops
one kind of finding is told apart."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from safeusb.host import bpfscan, procfs
from safeusb.host.model import DevNum, NodeKind, ProcessUse
from safeusb.host.parsers import parse_maps_devices
from safeusb.host.procfs import ProcessScan
from safeusb.host.roots import Roots
from tests.host.conftest import (
    Loop,
    _attach,
    background,
    held_on_inner_loop,
    mounted,
    run,
    wait_for,
)

HOLD = """
import mmap, os, sys, time
mnt = sys.argv[1]
with open(os.path.join(mnt, "mapped"), "r+b") as f:
    m = mmap.mmap(f.fileno(), 0)          # the map stays, the descriptor goes
held = open(os.path.join(mnt, "held"), "rb")
gone = open(os.path.join(mnt, "gone"), "rb")
os.unlink(os.path.join(mnt, "gone"))      # deleted, still open
print("ready", flush=True)
time.sleep(600)
"""

CHROOT = """
import os, sys, time
os.chroot(sys.argv[1])
print("ready", flush=True)
time.sleep(600)
"""

NULL = os.stat("/dev/null").st_rdev


def _devnum(raw: int) -> DevNum:
    return os.major(raw), os.minor(raw)


def differences(a: ProcessScan, b: ProcessScan) -> list[str]:
    """Field by field: every use of one that the other has not, and the unreadable."""
    out = []
    if len(a.uses) != len(b.uses):
        out.append(f"{len(a.uses)} uses against {len(b.uses)}")
    for i, (x, y) in enumerate(zip(a.uses, b.uses, strict=False)):
        for f in dataclasses.fields(ProcessUse):
            if getattr(x, f.name) != getattr(y, f.name):
                out.append(f"use {i}: {f.name} {getattr(x, f.name)!r} != {getattr(y, f.name)!r}")
    if a.unreadable != b.unreadable:
        out.append(f"unreadable {a.unreadable} != {b.unreadable}")
    return out


@pytest.fixture
def held(loop_ext4: Loop, tmp_path: Path) -> Iterator[tuple[list[int], frozenset[tuple[NodeKind, DevNum]], frozenset[DevNum]]]:  # noqa: E501
    if (why := bpfscan.unavailable(Roots.host())) is not None:
        pytest.skip(f"BPF iterators cannot run here: {why}")
    dev = _devnum(os.stat(loop_ext4.node).st_rdev)
    nodes: frozenset[tuple[NodeKind, DevNum]] = frozenset(
        {("block", dev), ("char", _devnum(NULL))})
    with mounted(loop_ext4.node, tmp_path / "m") as mnt:
        (mnt / "mapped").write_bytes(b"m" * 4096)
        (mnt / "held").write_bytes(b"h")
        (mnt / "gone").write_bytes(b"g")
        (mnt / "cwd").mkdir()
        private = tmp_path / "private"
        private.mkdir()
        script = f"mount {loop_ext4.node} {private} && cd {private} && echo ready && exec sleep 600"
        with open(loop_ext4.node, "rb") as node_fd, \
                background([sys.executable, "-c", HOLD, str(mnt)], stdout=subprocess.PIPE,
                           stdin=subprocess.DEVNULL) as a, \
                background([sys.executable, "-c", CHROOT, str(mnt)],
                           stdout=subprocess.PIPE) as b, \
                background(["sleep", "600"], cwd=mnt / "cwd") as c, \
                background(["sleep", "600"], stdin=node_fd) as d, \
                background(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                           stdout=subprocess.PIPE) as e:
            for p in (a, b, e):
                assert p.stdout is not None
                assert p.stdout.readline().strip() == b"ready"
            wait_for(lambda: Path(f"/proc/{e.pid}/comm").read_text().strip() == "sleep")
            yield [a.pid, b.pid, c.pid, d.pid, e.pid], nodes, frozenset({dev})


def _both(pids: list[int], nodes: frozenset[tuple[NodeKind, DevNum]],
          fs: frozenset[DevNum]) -> tuple[ProcessScan, ProcessScan]:
    roots = Roots.host()
    skip = frozenset({os.getpid()})
    kernel = bpfscan.scan_processes_kernel(roots, pids, nodes, fs, skip)
    proc = procfs.scan_processes(roots, pids, nodes, fs, skip)
    return kernel, proc


def test_kernel_scan_finds_what_proc_finds(held) -> None:  # type: ignore[no-untyped-def]
    ours, nodes, fs = held
    kernel, proc = _both(sorted([1, os.getpid(), *ours]), nodes, fs)
    assert differences(kernel, proc) == []
    a, b, c, d, e = ours
    got = {(u.pid, u.how, u.path.rsplit("/", 1)[-1]) for u in kernel.uses}
    assert {(a, "fd", "held"), (a, "fd", "gone (deleted)"), (a, "mmap", "mapped"),
            (a, "fd", "null"), (b, "root", "m"), (c, "cwd", "cwd"),
            (d, "fd", os.path.basename(os.readlink(f"/proc/{d}/fd/0")))} <= got, got
    assert (e, "cwd") in {(u.pid, u.how) for u in kernel.uses}
    assert all(u.fs in fs or u.node in nodes for u in kernel.uses)


def test_kernel_scan_without_a_filesystem(held) -> None:  # type: ignore[no-untyped-def]
    # Asked for the nodes alone (a device with no filesystem on it): the kernel walks open
    # files only, and finds what /proc finds, the nodes held open and nothing else.
    ours, nodes, _fs = held
    blocks = frozenset(n for n in nodes if n[0] == "block")
    kernel, proc = _both(sorted([1, os.getpid(), *ours]), blocks, frozenset())
    assert differences(kernel, proc) == []
    d = ours[3]
    assert [(u.pid, u.how, u.node) for u in kernel.uses] == [(d, "fd", next(iter(blocks)))]


MAP_NODE = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDWR)
if libc.mmap(None, 4096, 3, 1, fd, 0) in (None, ctypes.c_void_p(-1).value):
    sys.exit("mmap failed")
os.close(fd)  # the shared mapping alone holds the device now
print("ready", flush=True)
time.sleep(600)
"""


def test_a_mapping_of_the_node_holds_the_device(loop_ext4: Loop,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A shared mapping of the block node whose descriptor was closed: the process can
    # still write to the device through it, so both scans must find it, by the node.
    if (why := bpfscan.unavailable(Roots.host())) is not None:
        pytest.skip(f"BPF iterators cannot run here: {why}")
    dev = _devnum(os.stat(loop_ext4.node).st_rdev)
    blocks: frozenset[tuple[NodeKind, DevNum]] = frozenset({("block", dev)})
    with background([sys.executable, "-c", MAP_NODE, loop_ext4.node],
                    stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) as p:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == b"ready"
        assert not any(os.path.realpath(f"/proc/{p.pid}/fd/{n}") == loop_ext4.node
                       for n in os.listdir(f"/proc/{p.pid}/fd"))
        for fs in (frozenset(), frozenset({dev})):
            kernel, proc = _both([1, os.getpid(), p.pid], blocks, fs)
            assert differences(kernel, proc) == []
            assert [(u.pid, u.how, u.path, u.node) for u in kernel.uses] == \
                [(p.pid, "mmap", loop_ext4.node, ("block", dev))]
        # Without CAP_SYS_ADMIN map_files cannot be followed: the node is found by its
        # path in the process's root, the same inode as the maps line names.
        real_stat = os.stat

        def no_map_files(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            if "/map_files/" in str(path):
                raise PermissionError(1, "Operation not permitted", str(path))
            return real_stat(path, *args, **kwargs)

        monkeypatch.setattr(os, "stat", no_map_files)
        denied = procfs.scan_processes(Roots.host(), [p.pid], blocks, frozenset())
        monkeypatch.undo()
        assert denied == proc


def test_kernel_scan_over_every_process(held) -> None:  # type: ignore[no-untyped-def]
    # Without the character node (every process of the host holds /dev/null, and they
    # come and go between the two scans): uses of the loop device only.
    ours, nodes, fs = held
    blocks = frozenset(n for n in nodes if n[0] == "block")
    pids = procfs.list_pids(Roots.host())
    kernel, proc = _both(pids, blocks, fs)
    assert differences(kernel, proc) == []
    assert {u.pid for u in kernel.uses} == set(ours)


@pytest.mark.parametrize("dropped", ["fd", "mmap", "cwd", "root"])
def test_comparison_tells_a_dropped_kind(held, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                         dropped: str) -> None:
    ours, nodes, fs = held
    kind = {"fd": 1, "cwd": 2, "root": 3, "mmap": 4}[dropped]
    real = bpfscan.read_records

    def dropping(devs: dict[int, int], **kw: Any) -> bytes:
        data = real(devs, **kw)
        size = bpfscan._REC.size
        return b"".join(data[i:i + size] for i in range(0, len(data), size)
                        if bpfscan._REC.unpack_from(data, i)[0] != kind)

    monkeypatch.setattr(bpfscan, "read_records", dropping)
    kernel, proc = _both(sorted(ours), nodes, fs)
    assert differences(kernel, proc) != []
    assert dropped not in {u.how for u in kernel.uses}
    assert dropped in {u.how for u in proc.uses}


def test_a_process_whose_mappings_were_not_walked_is_read_in_proc(  # type: ignore[no-untyped-def]
        held, monkeypatch: pytest.MonkeyPatch) -> None:
    """The open-coded walk only tries a process's mm lock; a process it could not walk is
    written out as unread, and its /proc/PID/maps stands in: its mapping is found as
    the /proc scan finds it."""
    ours, nodes, fs = held
    mapper = ours[0]
    real = bpfscan.read_records

    def busy(devs: dict[int, int], **kw: Any) -> bytes:
        data = real(devs, **kw)
        size = bpfscan._REC.size
        kept = [data[i:i + size] for i in range(0, len(data), size)
                if bpfscan._REC.unpack_from(data, i)[:2] != (bpfscan._MMAP, mapper)]
        assert len(kept) < len(data) // size  # its mapping was there
        unread = bpfscan._REC.pack(bpfscan._MAPS_UNREAD, mapper, -1, 0, 0, 0, 0, 0, 0, 0)
        return b"".join([*kept, unread])

    monkeypatch.setattr(bpfscan, "read_records", busy)
    kernel, proc = _both(sorted(ours), nodes, fs)
    assert differences(kernel, proc) == []
    assert (mapper, "mmap") in {(u.pid, u.how) for u in kernel.uses}


def test_the_halves_find_what_the_whole_walk_finds(held) -> None:  # type: ignore[no-untyped-def]
    """Where the kernel has the open-coded iterator, the mappings are walked in two
    halves; the records are those of the one-pass walk (which older kernels use)."""
    ours, nodes, fs = held
    devs = {bpfscan._kdev(d): bpfscan._DEV_FS for d in fs}
    for kind, d in nodes:
        devs[bpfscan._kdev(d)] = devs.get(bpfscan._kdev(d), 0) | (
            bpfscan._DEV_BLOCK if kind == "block" else bpfscan._DEV_CHAR)
    bpfscan.read_records(devs, programs=("scan_files",))  # loaded, the map filled
    pin_dir = bpfscan._ready(bpfscan.OBJECT)
    with open("/proc/kallsyms", encoding="ascii", errors="replace") as f:
        kfuncs = any(line.rstrip().endswith(" bpf_iter_task_vma_new") for line in f)
    if not os.path.exists(f"{pin_dir}/{bpfscan.HALVES[0]}"):
        # Linux < 6.7: the object loaded without them, and the one-pass walk (which the
        # tests above compare with /proc) is the one that runs.
        assert not kfuncs, "the kernel has the open-coded iterator; the halves did not load"
        assert os.path.exists(f"{pin_dir}/scan_maps")
        return
    assert kfuncs

    def records(*names: str) -> set[tuple[int, ...]]:
        data = b"".join(bpfscan._run(pin_dir, n) for n in names)
        return {r for r in bpfscan._REC.iter_unpack(data) if r[0] == bpfscan._MMAP}

    whole = records("scan_maps")
    assert whole
    assert {r[1] for r in whole} >= {ours[0]}
    assert records(*bpfscan.HALVES) == whole
    even, odd = records(bpfscan.HALVES[0]), records(bpfscan.HALVES[1])
    assert all(r[1] % 2 == 0 for r in even) and all(r[1] % 2 == 1 for r in odd)


def test_scan_falls_back_to_proc_with_the_reason(held, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                                 ) -> None:
    ours, nodes, fs = held

    def refused(devs: dict[int, int], **kw: Any) -> bytes:
        raise bpfscan.Unavailable("refused for the test")

    monkeypatch.setattr(bpfscan, "read_records", refused)
    scan, why = bpfscan.scan(Roots.host(), sorted(ours), nodes, fs)
    assert why == "refused for the test"
    assert differences(scan, procfs.scan_processes(Roots.host(), sorted(ours), nodes, fs)) == []
    assert scan.uses


def test_mount_namespaces_from_the_kernel_match_proc(held) -> None:  # type: ignore[no-untyped-def]
    ours, _nodes, _fs = held
    roots = Roots.host()
    pids = sorted([1, os.getpid(), *ours])
    ns_of = bpfscan.mount_namespaces()
    for pid in ours:
        assert f"mnt:[{ns_of[pid]}]" == os.readlink(f"/proc/{pid}/ns/mnt")
    kernel = procfs.read_mount_namespaces(roots, pids, ns_of)
    proc = procfs.read_mount_namespaces(roots, pids)
    assert kernel == proc
    assert len({ns.inode for ns in kernel.namespaces}) >= 2  # the private one too


def test_snapshots_alike_with_and_without_the_kernel_scan(held, loop_ext4: Loop) -> None:  # type: ignore[no-untyped-def]
    from safeusb.host.selector import Selector, resolve  # noqa: PLC0415
    from safeusb.host.snapshot import read_snapshot  # noqa: PLC0415

    roots = Roots.host()
    target = resolve(Selector.from_string(loop_ext4.node), roots)
    kernel = read_snapshot(roots, target)
    proc = read_snapshot(roots, target, kernel_scan=False)
    ours = set(held[0])
    # Other processes of the host come and go between the two: the device's users are
    # this test's processes only.
    assert {u.pid for u in kernel.uses} == ours
    assert kernel.uses == proc.uses
    assert kernel.fs_devices == proc.fs_devices

    def mounts(snap):  # type: ignore[no-untyped-def]
        return sorted((ns.inode, ns.pid, m.mountpoint) for ns in snap.namespaces
                      for m in ns.mounts if m.devnum in snap.fs_devices)

    assert mounts(kernel) == mounts(proc)
    assert len({inode for inode, _, _ in mounts(kernel)}) == 2  # the host's, the private one


def test_loaded_afresh_and_a_broken_pin_reloaded(held) -> None:  # type: ignore[no-untyped-def]
    ours, nodes, fs = held
    bpfscan.unload()
    assert not [n for n in os.listdir(bpfscan.PIN_ROOT) if n.startswith(bpfscan.PIN_PREFIX)]
    kernel, proc = _both(sorted(ours), nodes, fs)  # loads and pins the programs
    assert differences(kernel, proc) == []
    pin = bpfscan._pin_dir(bpfscan.OBJECT)
    os.unlink(os.path.join(pin, "scan_files"))
    with pytest.raises(bpfscan.Unavailable, match="scan_files"):
        bpfscan.scan_processes_kernel(Roots.host(), sorted(ours), nodes, fs)
    assert not os.path.exists(pin)  # removed, so that the next scan loads it again
    kernel, proc = _both(sorted(ours), nodes, fs)
    assert differences(kernel, proc) == []


def test_a_pin_directory_not_roots_own_is_never_used(held, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ours, nodes, fs = held
    bpfscan.unload()
    pin = bpfscan._pin_dir(bpfscan.OBJECT)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    os.symlink(victim, pin)  # as anyone may, /sys/fs/bpf being world-writable
    try:
        kernel, proc = _both(sorted(ours), nodes, fs)
        assert differences(kernel, proc) == []
        assert (victim / "keep").exists()  # removed the link, not what it points to
        assert os.path.isdir(pin) and not os.path.islink(pin)
        os.chmod(pin, 0o755)  # not private: removed and loaded again
        kernel, proc = _both(sorted(ours), nodes, fs)
        assert differences(kernel, proc) == []
        assert os.stat(pin).st_mode & 0o777 == 0o700
    finally:
        if os.path.islink(pin):
            os.unlink(pin)


def _count_scans(monkeypatch: pytest.MonkeyPatch) -> list[frozenset[DevNum]]:
    """The filesystems each process scan of read_snapshot was asked about."""
    from safeusb.host import snapshot  # noqa: PLC0415

    asked: list[frozenset[DevNum]] = []
    real = snapshot.scan_processes

    def counted(*args: Any, **kwargs: Any) -> Any:
        asked.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(snapshot, "scan_processes", counted)
    return asked


def test_the_scan_ahead_of_the_mount_tables_serves(held, loop_ext4: Loop,  # type: ignore[no-untyped-def]
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-kernel scan runs while the mount tables are read, for the device's own
    filesystem; the mounts add none here, so it is the one scan."""
    from safeusb.host.selector import Selector, resolve  # noqa: PLC0415
    from safeusb.host.snapshot import read_snapshot  # noqa: PLC0415

    roots = Roots.host()
    target = resolve(Selector.from_string(loop_ext4.node), roots)
    asked = _count_scans(monkeypatch)
    snap = read_snapshot(roots, target)
    assert asked == [held[2]]
    assert {u.pid for u in snap.uses} == set(held[0])


def test_a_filesystem_the_mounts_add_is_scanned_again(loop_ext4: Loop, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop device backed by a file on the device's filesystem, with a filesystem of its
    own mounted and a file on it held open: the scan run ahead of the mount tables did not
    know that filesystem, so it runs again, and the holder is found as without the kernel
    scan."""
    if (why := bpfscan.unavailable(Roots.host())) is not None:
        pytest.skip(f"BPF iterators cannot run here: {why}")
    from safeusb.host.selector import Selector, resolve  # noqa: PLC0415
    from safeusb.host.snapshot import read_snapshot  # noqa: PLC0415

    with held_on_inner_loop(loop_ext4.node, tmp_path) as (inner, p):
        roots = Roots.host()
        target = resolve(Selector.from_string(loop_ext4.node), roots)
        asked = _count_scans(monkeypatch)
        kernel = read_snapshot(roots, target)
        assert len(asked) == 2 and asked[0] < asked[1], asked
        inner_dev = _devnum(os.stat(inner).st_rdev)
        assert (p.pid, "fd", inner_dev) in {(u.pid, u.how, u.fs) for u in kernel.uses}
        monkeypatch.undo()
        proc = read_snapshot(roots, target, kernel_scan=False)
        assert [u for u in kernel.uses if u.pid == p.pid] == \
            [u for u in proc.uses if u.pid == p.pid]


CHANGES = """
import mmap, os, sys
path = sys.argv[1]
m = None
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "map":
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 4096, access=mmap.ACCESS_READ)
    elif line.strip() == "unmap":
        m.close()
    elif line.strip() == "exec":
        os.execv(sys.executable, [sys.executable, "-c", sys.argv[2], path])
    print("done", flush=True)
"""

MAP_AFTER_EXEC = """
import mmap, sys, time
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 4096, access=mmap.ACCESS_READ)
print("done", flush=True)
time.sleep(600)
"""


def _summary_bits(pid: int) -> int:
    """The filesystem bits of a process's summary (scan.bpf.c: fs_bit), from its maps."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        devs = parse_maps_devices(f.read())
    bits = 0
    for d in devs:
        bits |= bpfscan._fs_bit(bpfscan._kdev(d))
    return bits


@contextlib.contextmanager
def _loop_of_its_own(loop: Loop, pid: int) -> Iterator[str]:
    """``loop``'s image on a loop device whose filesystem bit no filesystem that ``pid``
    maps has (the summaries are a 64-bit set of hashed device numbers: where the device's
    bit is already set by, say, the root filesystem's, the summary never lets the process
    be passed over, and a summary kept too long would go unseen). Further loop devices
    are attached to the image until one has such a bit."""
    taken = _summary_bits(pid)
    extra: list[str] = []
    node = loop.node
    try:
        while bpfscan._fs_bit(bpfscan._kdev(_devnum(os.stat(node).st_rdev))) & taken:
            assert len(extra) < 64, "no loop device with a bit of its own"
            node = _attach(loop.image)
            extra.append(node)
        yield node
    finally:
        for n in extra:
            run("losetup", "-d", n, check=False)


def _follow_changes(p: subprocess.Popen[bytes], nodes: frozenset[tuple[NodeKind, DevNum]],
                    fs: frozenset[DevNum]) -> None:
    """Scans between a process's changes: walked twice with nothing of the device (the
    second rests on the summary of the first), then after it maps, unmaps, and execs
    into an image that maps, each scan finds what /proc finds."""

    def step(command: str) -> None:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(command.encode() + b"\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == b"done"

    def mapped() -> bool:
        kernel, proc = _both([p.pid], nodes, fs)
        assert differences(kernel, proc) == []
        return (p.pid, "mmap") in {(u.pid, u.how) for u in kernel.uses}

    assert not mapped() and not mapped()
    step("map")
    assert mapped() and mapped()
    step("unmap")
    assert not mapped() and not mapped()
    step("exec")
    assert mapped()


def test_kept_summaries_follow_what_processes_map(loop_ext4: Loop, tmp_path: Path) -> None:
    """A process walked once is not walked again while its mappings stand (scan.bpf.c's
    summaries, Linux >= 6.7). A mapping of a file on the device's filesystem it adds,
    removes, or a new image (exec) after a scan is found, and gone, on the next scan, as
    /proc finds it."""
    if (why := bpfscan.unavailable(Roots.host())) is not None:
        pytest.skip(f"BPF iterators cannot run here: {why}")
    target = tmp_path / "m" / "mapped"
    with background([sys.executable, "-c", CHANGES, str(target), MAP_AFTER_EXEC],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == b"ready"
        with _loop_of_its_own(loop_ext4, p.pid) as node, \
                mounted(node, tmp_path / "m"):
            try:
                target.write_bytes(b"m" * 4096)
                dev = _devnum(os.stat(node).st_rdev)
                _follow_changes(p, frozenset({("block", dev)}), frozenset({dev}))
            finally:
                p.kill()  # its mapping would keep the filesystem from being unmounted
                p.wait()


def test_kept_summaries_follow_what_processes_map_of_a_node(loop_ext4: Loop) -> None:
    """The same for a mapping of the device's block node, looked for alone (no
    filesystem): the summary's node bits, not the filesystems', let the process be passed
    over, then a mapping of the node is found on the next scan."""
    if (why := bpfscan.unavailable(Roots.host())) is not None:
        pytest.skip(f"BPF iterators cannot run here: {why}")
    dev = _devnum(os.stat(loop_ext4.node).st_rdev)
    with background([sys.executable, "-c", CHANGES, loop_ext4.node, MAP_AFTER_EXEC],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == b"ready"
        _follow_changes(p, frozenset({("block", dev)}), frozenset())
