"""The man page is generated from the CLI definition and kept in sync."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _body(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith(".TH ")]


def test_manpage_matches_the_cli(tmp_path: Path) -> None:
    if shutil.which("argparse-manpage", path=str(ROOT / ".venv" / "bin")) is None:
        pytest.skip("argparse-manpage is not installed (scripts/setup --test installs it)")
    out = tmp_path / "safeusb.1"
    subprocess.run([str(ROOT / "tools" / "gen-manpage"), str(out)], check=True)
    committed = (ROOT / "docs" / "safeusb.1").read_text()
    assert _body(out.read_text()) == _body(committed), (
        "docs/safeusb.1 is out of date: run tools/gen-manpage")
    for command in ("inspect", "prepare", "release", "status", "install-hook",
                    "attach-device", "protect"):
        assert f"safeusb {command}".replace("-", "\\-") in committed.replace("\\fR \\fI\\,", " ")
