"""The gate in front of a real QEMU deciding through safeusbd on a socket of its own: the
daemon's reasons reach libvirt's side, a stopped daemon is a refusal saying how to start
it, and a decision past the gate's deadline is cancelled in the daemon and answered only
once the daemon has undone its work."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_root
from tests.host.conftest import wait_for
from tests.host.test_daemon_host import HANG, Served, _answers, serve_safeusbd
from tests.host.test_gate import QEMU, gated

pytestmark = [pytest.mark.host,
              pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")]

# No host has a USB bus 999: the daemon looks and finds nothing, whatever this host has.
NOWHERE = {"hostbus": 999, "hostaddr": 127}


@pytest.fixture
def safeusbd(tmp_path: Path) -> Iterator[Served]:
    with serve_safeusbd(tmp_path) as served:
        yield served


def test_the_daemons_reason_reaches_the_client(safeusbd: Served, tmp_path: Path) -> None:
    with gated(tmp_path, None, ("--daemon-socket", safeusbd.socket)) as g:
        reply = g.cmd("device_add", driver="usb-host", id="h1", **NOWHERE)
    desc = reply["error"]["desc"]
    logged = re.search(r"prepare bus 999 device 127: (.*)", safeusbd.logged())
    assert logged, safeusbd.logged()
    # the daemon's own words, as it logged them, and nothing else
    assert desc == f"safeusb: {logged.group(1)}", (desc, safeusbd.logged())
    assert "prepare bus 999 device 127 for domain gated" in safeusbd.logged()
    assert "refused usb-host hostbus=999,hostaddr=127" in g.log.read_text()


def test_a_stopped_daemon_is_a_refusal_that_says_how_to_start_it(
        safeusbd: Served, tmp_path: Path) -> None:
    safeusbd.proc.send_signal(signal.SIGTERM)
    assert safeusbd.proc.wait(HANG) == 0
    with gated(tmp_path, None, ("--daemon-socket", safeusbd.socket)) as g:
        reply = g.cmd("device_add", driver="usb-host", id="h1", **NOWHERE)
        names = {p["name"] for p in g.cmd("qom-list", path="/machine/peripheral")["return"]}
    assert reply["error"]["desc"] == (
        f"safeusb: safeusbd is not running (no socket at {safeusbd.socket}); start it with "
        "`systemctl start safeusbd.socket`; nothing was done")
    assert "h1" not in names


@pytest.fixture
def slow_daemon(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    require_root()  # the daemon's rules: only root or a domain's QEMU may prepare
    path = str(tmp_path / "d.sock")
    mark = tmp_path / "host-changed"
    with open(tmp_path / "daemon.log", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.host.fake_safeusbd", path,
                                 str(mark)], stderr=err, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_for(lambda: os.path.exists(path) and _answers(Served(proc, path, tmp_path)),
                 timeout=HANG)
        yield path, mark
    finally:
        proc.terminate()
        proc.wait(HANG)


@pytest.mark.fault
def test_a_cancelled_decision_is_undone_in_the_daemon_before_the_answer(
        slow_daemon: tuple[str, Path], tmp_path: Path) -> None:
    path, mark = slow_daemon
    with gated(tmp_path, None, ("--daemon-socket", path, "--decision-timeout", "1")) as g:
        reply = g.cmd("device_add", driver="usb-host", hostbus=1, hostaddr=3, id="h1")
        # The answer came only after the daemon's prepare saw the cancel and undid.
        assert not mark.exists(), "refused while the host was still changed"
        assert (tmp_path / "cancel-seen").read_text() == "bus 1 addr 3 domain gated"
        assert reply["error"]["desc"] == (
            "safeusb: no decision within 1 s; prepare was cancelled; host state: as before")
        assert "cancelling it" in g.log.read_text()
        names = {p["name"] for p in g.cmd("qom-list", path="/machine/peripheral")["return"]}
        assert "h1" not in names
