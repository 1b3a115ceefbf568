"""`safeusb guard status` on this machine's own kernel: it answers, and its exit code says
what its text says (0 on, 3 off, 4 not available here, with the reason)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.host


def test_guard_status_on_this_kernel(safeusb_cmd: list[str]) -> None:
    require_root()
    js = subprocess.run([*safeusb_cmd, "guard", "status", "--json"], capture_output=True,
                        text=True, check=False)
    text = subprocess.run([*safeusb_cmd, "guard", "status"], capture_output=True, text=True,
                          check=False)
    rep = json.loads(js.stdout)
    assert js.returncode == text.returncode
    if rep["enabled"]:
        assert text.returncode == 0 and text.stdout.startswith("guard: on")
    elif rep["available"]:
        assert text.returncode == 3 and text.stdout.startswith("guard: off")
    else:
        assert text.returncode == 4, text.stdout
        first = text.stdout.splitlines()[0]
        assert first.startswith("guard: not available on this kernel: ")
        assert rep["unavailable_because"] and all(r in first
                                                  for r in rep["unavailable_because"])
        if rep["lsms"] is not None and "bpf" not in rep["lsms"]:
            assert "lsm=" in text.stdout and ",bpf" in text.stdout
    # enabling where it is not available fails with the same code and the reason
    if not rep["available"] and not rep["enabled"]:
        en = subprocess.run([*safeusb_cmd, "guard", "enable"], capture_output=True,
                            text=True, check=False)
        assert en.returncode == 4
        assert en.stderr.startswith("safeusb: guard not available on this kernel: ")
