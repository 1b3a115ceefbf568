"""Shared test configuration: tiers and their honest skip reasons."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAFEUSB = ROOT / ".venv" / "bin" / "safeusb"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "host: needs root and real host kernel objects")


def require_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("host-kernel tests must run as root in CI")
        pytest.skip("host-kernel tests need root (loop devices, mounts, namespaces)")


@pytest.fixture
def safeusb_cmd() -> list[str]:
    """The installed command when present, else the module under this interpreter."""
    if SAFEUSB.exists():
        return [str(SAFEUSB)]
    return [sys.executable, "-m", "safeusb.cli"]
