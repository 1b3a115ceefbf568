"""The gate in front of a real QEMU (TCG, no guest), its monitor passed in as libvirt 9 does."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from safeusb.gate.qmp import send_with_fds

QEMU = shutil.which("qemu-system-x86_64")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


@dataclass
class Gated:
    qemu: subprocess.Popen[bytes]
    client: socket.socket
    path: str
    log: Path
    reader: Any = None

    def connect(self) -> dict[str, Any]:
        self.client = socket.socket(socket.AF_UNIX)
        self.client.connect(self.path)
        self.client.settimeout(20)
        self.reader = self.client.makefile("rb")
        return self.read()

    def read(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line, "monitor closed"
        return json.loads(line)  # type: ignore[no-any-return]

    def cmd(self, execute: str, fds: list[int] | None = None, **arguments: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": execute, "id": f"t-{execute}"}
        if arguments:
            msg["arguments"] = arguments
        send_with_fds(self.client, json.dumps(msg).encode() + b"\r\n", fds or [])
        while True:
            reply = self.read()
            if "event" not in reply:
                assert reply.get("id") == msg["id"], reply
                return reply

    def proxy_pid(self) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = re.search(r"safeusb-qemu-gate\[(\d+)\]: guards", self.log.read_text())
            if m:
                return int(m.group(1))
            time.sleep(0.05)
        raise AssertionError(self.log.read_text())

    def eof_within(self, seconds: float) -> bool:
        r, _, _ = select.select([self.client], [], [], seconds)
        if not r:
            return False
        try:
            return self.client.recv(65536, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            return True


@contextlib.contextmanager
def gated(tmp_path: Path, decision: str | None = "tests.host.gate_decisions:refuse_bus_9",
          extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Iterator[Gated]:
    """The gate before a real QEMU; decision None: its own (asking safeusbd)."""
    assert QEMU is not None
    path = str(tmp_path / "monitor.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    log = tmp_path / "domain.log"
    argv = [sys.executable, "-m", "safeusb.gate.launcher", "--real-emulator", QEMU,
            *(("--decision", decision) if decision else ()), *extra, "--",
            "-name", "guest=gated,debug-threads=on", "-machine", "pc,accel=tcg",
            "-nodefaults", "-display", "none", "-S", "-m", "32",
            "-chardev", f"socket,id=charmonitor,fd={fd},server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control",
            "-device", '{"driver":"qemu-xhci","id":"usb","bus":"pci.0","addr":"0x2"}']
    with open(log, "wb") as logf:
        qemu = subprocess.Popen(argv, pass_fds=[fd], stdout=logf, stderr=logf,
                                env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)})
    listener.close()
    g = Gated(qemu, socket.socket(), path, log)
    try:
        greeting = g.connect()
        assert "QMP" in greeting
        assert g.cmd("qmp_capabilities") == {"return": {}, "id": "t-qmp_capabilities"}
        yield g
    finally:
        g.client.close()
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
        for pid in _proxies(log):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _proxies(log: Path) -> set[int]:
    return {int(p) for p in re.findall(r"safeusb-qemu-gate\[(\d+)\]", log.read_text())}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_qemu_runs_in_the_process_libvirt_started(tmp_path: Path) -> None:
    with gated(tmp_path) as g:
        assert os.readlink(f"/proc/{g.qemu.pid}/exe") == os.path.realpath(QEMU or "")
        assert g.cmd("query-status")["return"]["status"] == "prelaunch"


def test_allowed_usb_host_reaches_qemu(tmp_path: Path) -> None:
    with gated(tmp_path) as g:
        reply = g.cmd("device_add", driver="usb-host", hostbus=1, hostaddr=3, id="h1")
        # QEMU's own answer: it looked for host device 1:3 (this host has no USB)
        assert reply["error"]["desc"] == "failed to find host usb device 1:3"
        assert "allowed usb-host hostbus=1,hostaddr=3" in g.log.read_text()


def test_refused_usb_host_never_reaches_qemu(tmp_path: Path) -> None:
    with gated(tmp_path) as g:
        reply = g.cmd("device_add", driver="usb-host", hostbus=9, hostaddr=3, id="h9")
        assert reply["error"] == {
            "class": "GenericError", "desc": "safeusb: bus 9 device 3 is mounted at /mnt/test"}
        hmp = g.cmd("human-monitor-command",
                    **{"command-line": "device_add usb-host,hostbus=9,hostaddr=4"})
        assert hmp["error"]["desc"].startswith("safeusb: bus 9 device 4")
        assert "failed to find host usb device 9" not in json.dumps(reply)
        # other devices and commands are untouched
        assert g.cmd("device_add", driver="usb-kbd", id="kbd0", bus="usb.0") == {
            "return": {}, "id": "t-device_add"}
        names = {p["name"] for p in g.cmd("qom-list", path="/machine/peripheral")["return"]}
        assert "kbd0" in names and "h9" not in names


def test_a_crashing_decision_refuses(tmp_path: Path) -> None:
    with gated(tmp_path, "tests.host.gate_decisions:crash") as g:
        reply = g.cmd("device_add", driver="usb-host", hostbus=1, hostaddr=3)
        assert reply["error"]["desc"] == (
            "safeusb: the decision failed (RuntimeError: decision exploded)")
        assert g.cmd("query-status")["return"]["status"] == "prelaunch"


def test_fds_pass_through_getfd_closefd_and_add_fd(tmp_path: Path) -> None:
    with gated(tmp_path) as g:
        r, w = os.pipe()
        try:
            assert g.cmd("getfd", fds=[r], fdname="p")["return"] == {}
            assert g.cmd("closefd", fdname="p")["return"] == {}
            assert "not found" in g.cmd("closefd", fdname="p")["error"]["desc"]
            added = g.cmd("add-fd", fds=[w], **{"fdset-id": 3, "opaque": "pipe-w"})["return"]
            assert added["fdset-id"] == 3
            sets = g.cmd("query-fdsets")["return"]
            assert [s["fds"][0]["opaque"] for s in sets if s["fdset-id"] == 3] == ["pipe-w"]
        finally:
            os.close(r)
            os.close(w)


def test_reconnect_gets_a_fresh_greeting(tmp_path: Path) -> None:
    with gated(tmp_path) as g:
        g.client.close()
        assert "QMP" in g.connect()
        assert g.cmd("qmp_capabilities")["return"] == {}
        assert g.cmd("query-status")["return"]["status"] == "prelaunch"


def test_fd_sets_from_an_earlier_session_stay_unknown(tmp_path: Path) -> None:
    """QEMU keeps a paused guest's fd sets across monitor sessions; the next session's
    gate never saw what they hold, so a set one of them fills further is refused."""
    with gated(tmp_path) as g:
        fd = os.open("/dev/null", os.O_RDWR)
        try:
            assert g.cmd("add-fd", fds=[fd], **{"fdset-id": 4})["return"]["fdset-id"] == 4
            g.client.close()
            assert "QMP" in g.connect()
            assert g.cmd("qmp_capabilities")["return"] == {}
            assert g.cmd("add-fd", fds=[fd], **{"fdset-id": 4})["return"]["fdset-id"] == 4
            held = [s["fds"] for s in g.cmd("query-fdsets")["return"] if s["fdset-id"] == 4]
            assert len(held) == 1 and len(held[0]) == 2  # QEMU holds both sessions' fds
            reply = g.cmd("device_add", driver="usb-host", hostdevice="/dev/fdset/4")
            assert "did not come with its add-fd" in reply["error"]["desc"], reply
        finally:
            os.close(fd)


def test_qemu_exit_closes_the_monitor_and_ends_the_proxy(tmp_path: Path) -> None:
    with gated(tmp_path) as g:
        proxy = g.proxy_pid()
        g.cmd("quit")
        assert g.eof_within(10)
        assert g.qemu.wait(10) == 0
        deadline = time.monotonic() + 10
        while _alive(proxy) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(proxy)


@pytest.mark.fault
def test_gate_death_leaves_the_guest_running_and_libvirt_connected(tmp_path: Path) -> None:
    with gated(tmp_path) as g:
        g.cmd("cont")
        os.kill(g.proxy_pid(), signal.SIGKILL)
        # no end of stream for libvirt: it must not conclude that QEMU died
        assert not g.eof_within(2.0)
        assert g.qemu.poll() is None
        # the monitor no longer answers; nothing reaches QEMU (fail closed)
        send_with_fds(g.client, b'{"execute":"device_add","arguments":{"driver":"usb-host",'
                      b'"hostbus":1,"hostaddr":3},"id":1}\r\n', [])
        assert not g.eof_within(1.0)
        # the guest ending is still seen as the monitor's end
        g.qemu.terminate()
        assert g.qemu.wait(10) is not None
        assert g.eof_within(10)
