"""The systemd units shipped for safeusbd parse, and the tmpfiles entry makes /run/safeusb
searchable but not listable by others."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNITS = ROOT / "systemd"
SAFEUSBD = ROOT / ".venv" / "bin" / "safeusbd"


def test_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    if not SAFEUSBD.exists():
        pytest.skip(f"{SAFEUSBD} is not installed (pip install -e . in .venv)")
    shutil.copy(UNITS / "safeusbd.socket", tmp_path)
    service = (UNITS / "safeusbd.service").read_text()
    assert "ExecStart=/usr/bin/safeusbd\n" in service
    (tmp_path / "safeusbd.service").write_text(
        service.replace("ExecStart=/usr/bin/safeusbd", f"ExecStart={SAFEUSBD}"))
    p = subprocess.run([analyze, "verify", "--man=no", "./safeusbd.socket",
                        "./safeusbd.service"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stderr == "" and p.stdout == "", p.stderr + p.stdout


def test_socket_unit_listens_where_the_daemon_and_client_expect() -> None:
    from safeusb.safeusbd.server import DEFAULT_SOCKET  # noqa: PLC0415

    socket_unit = (UNITS / "safeusbd.socket").read_text().splitlines()
    assert f"ListenStream={DEFAULT_SOCKET}" in socket_unit
    assert "SocketMode=0666" in socket_unit and "DirectoryMode=0711" in socket_unit


def test_tmpfiles_entry(tmp_path: Path) -> None:
    tmpfiles = shutil.which("systemd-tmpfiles")
    if tmpfiles is None:
        pytest.skip("systemd-tmpfiles is not installed (package systemd)")
    p = subprocess.run([tmpfiles, f"--root={tmp_path}", "--create",
                        str(UNITS / "safeusb-tmpfiles.conf")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "safeusb").stat().st_mode & 0o7777 == 0o711
