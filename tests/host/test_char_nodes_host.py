"""The process scan finds character device nodes held open (root: every process)."""

from __future__ import annotations

import os

import pytest

from safeusb.host.procfs import list_pids, scan_processes
from safeusb.host.roots import Roots
from tests.conftest import require_root
from tests.host.conftest import background

pytestmark = pytest.mark.host


def test_process_holding_a_terminal_is_found() -> None:
    """A pseudo-terminal stands in for /dev/ttyUSB0: the same descriptor scan."""
    require_root()
    leader, follower = os.openpty()
    try:
        name = os.ttyname(follower)
        st = os.stat(name)
        node = ("char", (os.major(st.st_rdev), os.minor(st.st_rdev)))
        with background(["sleep", "600"], stdin=follower) as proc:
            roots = Roots.host()
            scan = scan_processes(roots, list_pids(roots), frozenset({node}), frozenset(),
                                  frozenset({os.getpid()}))
            uses = [u for u in scan.uses if u.node == node]
            assert [(u.pid, u.comm, u.how, u.path) for u in uses] == [
                (proc.pid, "sleep", "fd", name)]
    finally:
        os.close(leader)
        os.close(follower)
