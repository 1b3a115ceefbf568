"""A decision that outlasts the gate's deadline is cancelled, and the refusal reaches the
client only once the decision has put the host back: never while its work goes on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.host.test_gate import QEMU, ROOT, Gated

pytestmark = [pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
              pytest.mark.fault]


def test_refusal_waits_for_the_cancelled_decision_to_undo(tmp_path: Path) -> None:
    assert QEMU is not None
    path = str(tmp_path / "monitor.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    log, mark = tmp_path / "domain.log", tmp_path / "host-changed"
    argv = [sys.executable, "-m", "safeusb.gate", "--real-emulator", QEMU,
            "--decision", "tests.host.gate_decisions:slow_then_undo",
            "--decision-timeout", "1", "--",
            "-name", "guest=cancel", "-machine", "pc,accel=tcg", "-nodefaults",
            "-display", "none", "-S", "-m", "32",
            "-chardev", f"socket,id=charmonitor,fd={fd},server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control",
            "-device", '{"driver":"qemu-xhci","id":"usb","bus":"pci.0","addr":"0x2"}']
    with open(log, "wb") as logf:
        qemu = subprocess.Popen(argv, pass_fds=[fd], stdout=logf, stderr=logf,
                                env={**os.environ, "PYTHONPATH": str(ROOT),
                                     "SAFEUSB_TEST_MARK": str(mark)})
    listener.close()
    g = Gated(qemu, socket.socket(), path, log)
    try:
        assert "QMP" in g.connect()
        g.cmd("qmp_capabilities")
        reply = g.cmd("device_add", driver="usb-host", hostbus=1, hostaddr=3, id="h1")
        # The answer came only after the decision undid its change.
        assert not mark.exists(), "refused while the host was still changed"
        assert reply["error"]["desc"] == (
            "safeusb: no decision within 1 s; prepare was cancelled; host state: as before")
        assert "cancelling it" in log.read_text()
        names = {p["name"] for p in g.cmd("qom-list", path="/machine/peripheral")["return"]}
        assert "h1" not in names
    finally:
        g.client.close()
        qemu.kill()
        qemu.wait()
