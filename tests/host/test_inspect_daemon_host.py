"""`safeusb inspect` asks a running safeusbd, and prints exactly what reading the host
itself prints: the same text, the same JSON, the same exit code; with no daemon it reads
the host itself. Shown with a real safeusbd on a socket of its own and a loop ext4 that a
process holds, as root and as an unprivileged user (who could not read other processes'
descriptors: only the daemon's answer can be root's)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from safeusb import cli
from safeusb.safeusbd import protocol
from tests.conftest import ROOT, SAFEUSB
from tests.host.conftest import Loop, background, mounted, run
from tests.host.test_daemon_host import HANG, serve_safeusbd

pytestmark = pytest.mark.host
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _inspect(*args: str, cwd: Path = ROOT, prefix: tuple[str, ...] = ()
             ) -> tuple[int, str, str]:
    p = subprocess.run([*prefix, str(SAFEUSB), "inspect", *args], capture_output=True,
                       text=True, timeout=HANG, cwd=cwd)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout, p.stderr


def test_the_default_socket_is_the_daemons() -> None:
    assert cli.DEFAULT_SOCKET == protocol.DEFAULT_SOCKET


def test_inspect_through_safeusbd_prints_what_reading_the_host_prints(
        loop_ext4: Loop, tmp_path: Path) -> None:
    with serve_safeusbd(tmp_path) as served, mounted(loop_ext4.node, tmp_path / "m") as mnt:
        (mnt / "held").write_bytes(b"h")
        (mnt / "here").mkdir()
        run("sync")
        sock = ("--daemon-socket", served.socket)
        with open(mnt / "held", "rb") as held, \
                background(["sleep", "600"], stdin=held):
            for form in ((), ("--json",)):
                local = _inspect(loop_ext4.node, *form, "--local")
                assert local[0] == 1 and "held" in local[1], local
                assert _inspect(loop_ext4.node, *form, *sock) == local
                # The command's own working directory on the device: the command is left
                # out either way (it is the one asking).
                assert _inspect(loop_ext4.node, *form, *sock, cwd=mnt / "here") == \
                    _inspect(loop_ext4.node, *form, "--local", cwd=mnt / "here") == local

            # An unprivileged user reading the host itself cannot see the holder's
            # descriptors; through the daemon the answer is root's, whole.
            mine = _inspect(loop_ext4.node, "--local", prefix=tuple(NOBODY))
            assert "run as root" in mine[1], mine
            assert _inspect(loop_ext4.node, *sock, prefix=tuple(NOBODY)) == \
                _inspect(loop_ext4.node, "--local")

            # Selectors the daemon cannot resolve: the command's own error, exit 2.
            for bad in ("/dev/nonexistent-su", "999:999"):
                assert _inspect(bad, *sock) == _inspect(bad, "--local")

        # No daemon: the host is read here, same answer.
        served.proc.terminate()
        served.proc.wait(HANG)
        assert not os.path.exists(served.socket)
        assert _inspect(loop_ext4.node, "--daemon-socket", served.socket) == \
            _inspect(loop_ext4.node, "--local")
