"""The in-kernel scan's choices without a kernel: where it cannot run the /proc scan
runs, with the reason; the records the iterators write are read into the same findings
the /proc scan makes (the live comparison is tests/host/test_bpfscan_compare_host.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safeusb.host import bpfscan, procfs
from safeusb.host.bpfload import BPFError
from safeusb.host.roots import Roots


def test_device_numbers_in_the_kernels_encoding() -> None:
    for d in ((8, 1), (7, 0), (259, 3), (4095, 1048575)):
        assert bpfscan._from_kdev(bpfscan._kdev(d)) == d
    assert bpfscan._kdev((8, 1)) == (8 << 20) | 1


def test_a_recording_is_never_scanned_in_the_kernel(tmp_path: Path) -> None:
    roots = Roots.from_recording(str(tmp_path))
    why = bpfscan.unavailable(roots)
    assert why is not None and "live" in why
    assert bpfscan.unavailable(Roots(proc=str(tmp_path))) is not None


def test_falls_back_to_proc_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            ) -> None:
    (tmp_path / "proc").mkdir()
    roots = Roots.from_recording(str(tmp_path))
    monkeypatch.delenv(bpfscan.ENV, raising=False)
    scan, why = bpfscan.scan(roots, [], frozenset(), frozenset({(7, 0)}))
    assert why == bpfscan.unavailable(roots)
    assert scan == procfs.scan_processes(roots, [], frozenset(), frozenset({(7, 0)}))


def test_proc_chosen_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bpfscan.ENV, "proc")

    def never(*_args: object) -> None:
        raise AssertionError("the in-kernel scan ran")

    monkeypatch.setattr(bpfscan, "scan_processes_kernel", never)
    _, why = bpfscan.scan(Roots.host(), [os.getpid()], frozenset(), frozenset({(7, 0)}))
    assert why == "SAFEUSB_SCAN=proc"
    assert bpfscan.namespaces_of(Roots.host()) is None


def test_kernel_chosen_by_the_environment_refuses_to_fall_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bpfscan.ENV, "kernel")
    with pytest.raises(BPFError, match="cannot run"):
        bpfscan.scan(Roots.from_recording(str(tmp_path)), [], frozenset(), frozenset())


def _rec(kind: int, tgid: int, fd: int = -1, mode: int = 0o100644, dev: tuple[int, int] = (7, 0),
         rdev: tuple[int, int] = (0, 0), flags: int = 0) -> bytes:
    return bpfscan._REC.pack(kind, tgid, fd, mode, bpfscan._kdev(dev), bpfscan._kdev(rdev),
                             flags, 0, 12, 0)


def test_records_become_the_proc_scans_findings(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process holds a file and has its working directory on a filesystem; records
    as the kernel writes them for it give what the /proc scan finds."""
    me = os.getpid()
    here = os.stat(".")
    dev = (os.major(here.st_dev), os.minor(here.st_dev))
    with open(__file__, "rb") as f:
        if os.fstat(f.fileno()).st_dev != here.st_dev:
            pytest.skip("the test file is on another filesystem than the working directory")
        records = _rec(1, me, f.fileno(), dev=dev) + _rec(2, me, dev=dev) + \
            _rec(1, 999999999, 3, dev=dev)  # not among the pids: left out
        monkeypatch.setattr(bpfscan, "unavailable", lambda roots: None)
        monkeypatch.setattr(bpfscan, "read_records", lambda devs, **kw: records)
        got = bpfscan.scan_processes_kernel(Roots.host(), [me], frozenset(), frozenset({dev}))
    assert [(u.pid, u.how, u.fs) for u in got.uses] == [(me, "fd", dev), (me, "cwd", dev)]
    assert got.uses[0].path == os.path.realpath(__file__)
    assert got.uses[1].path == os.getcwd()
