"""Reassembling an md array right after its members come back: a failed attempt's
remains are stopped and it is tried again (built sysfs tree, commands recorded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from safeusb.host.runner import CommandFailed, Runner


class _Recorded(Runner):
    def __init__(self, sys_root: Path, failures: int) -> None:
        super().__init__(sys_root=str(sys_root))
        self.failures = failures
        self.argvs: list[list[str]] = []

    def run(self, argv: Sequence[str], timeout: float | None = 120) -> str:
        self.argvs.append([argv[0].rsplit("/", 1)[-1], *argv[1:]])
        if "--assemble" in argv and self.failures:
            self.failures -= 1
            raise CommandFailed(argv, 1, "mdadm: cannot re-read metadata from /dev/sdc2")
        return ""


def _tree(tmp_path: Path) -> Path:
    sys_root = tmp_path / "sys"
    for member in ("sdc1", "sdc2"):
        (sys_root / "class/block" / member).mkdir(parents=True)
        (sys_root / "class/block" / member / "size").write_text("63488\n")
    (sys_root / "block/md127/md").mkdir(parents=True)  # what the failed attempt left
    return sys_root


def test_failed_assembly_is_stopped_and_tried_again(tmp_path: Path) -> None:
    runner = _Recorded(_tree(tmp_path), failures=1)
    runner.assemble_md("/dev/md127", ("/dev/sdc1", "/dev/sdc2"))
    assert runner.argvs == [["mdadm", "--assemble", "/dev/md127", "/dev/sdc1", "/dev/sdc2"],
                            ["mdadm", "--stop", "/dev/md127"],
                            ["mdadm", "--assemble", "/dev/md127", "/dev/sdc1", "/dev/sdc2"]]


def test_assembly_failing_every_time_fails_the_undo(tmp_path: Path) -> None:
    runner = _Recorded(_tree(tmp_path), failures=5)
    with pytest.raises(CommandFailed, match="cannot re-read metadata"):
        runner.assemble_md("/dev/md127", ("/dev/sdc1", "/dev/sdc2"), tries=2)
    assert [a[1] for a in runner.argvs] == ["--assemble", "--stop", "--assemble"]
