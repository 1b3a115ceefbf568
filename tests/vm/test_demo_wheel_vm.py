"""`safeusb demo` as a user runs it: from the wheel, installed into a fresh virtual
environment outside the checkout (virtme-ng beside it), as root, from /. It boots its own
VM (in one of the tier's slots) and must show plain libvirt losing the data and safeusb
keeping it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from safeusb.lab.harness import Runner
from tests.packaging import Packages, missing_tools
from tests.vm import REPO

pytestmark = pytest.mark.vm

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def test_the_demo_from_an_installed_wheel(vm_runner: Runner, tmp_path: Path) -> None:
    missing = missing_tools("dist")
    if missing:
        pytest.skip(f"cannot build the wheel: {', '.join(missing)}")
    vng = REPO / ".venv" / "bin" / "vng"
    if not vng.exists():
        pytest.skip(f"{vng} is absent (virtme-ng is installed beside safeusb in .venv)")
    wheel = Packages(workdir=tmp_path / "build").wheel
    venv = tmp_path / "venv"
    env = {"PATH": SYSTEM_PATH, "HOME": str(tmp_path)}
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, env=env, cwd="/")
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index",
                    "--disable-pip-version-check", str(wheel)], check=True, env=env, cwd="/")
    for tool in [vng, *vng.parent.glob("virtme*")]:  # pip install virtme-ng, beside safeusb
        (venv / "bin" / tool.name).symlink_to(tool)
    with vm_runner.slot():
        demo = subprocess.run([str(venv / "bin" / "safeusb"), "demo", "--keep"],
                              capture_output=True, text=True, env=env, cwd="/",
                              timeout=1200, check=False)
    out = demo.stdout
    assert demo.returncode == 0, f"exit {demo.returncode}\n{out}\n{demo.stderr[-4000:]}"
    assert str(REPO) not in out  # nothing of the checkout ran
    lines = out.splitlines()
    plain = next(i for i, x in enumerate(lines) if x.strip().startswith("plain libvirt"))
    assert "exit 0" in lines[plain] and "LOST" in lines[plain + 1], out
    guarded = [i for i, x in enumerate(lines) if x.strip().startswith("safeusb, ")]
    assert len(guarded) == 2, out
    assert "exit 1" in lines[guarded[0]] and "still mounted" in lines[guarded[0] + 1], out
    assert "exit 0" in lines[guarded[1]] and "intact" in lines[guarded[1] + 1], out
    kept = next(x.split(" kept in ", 1)[1] for x in lines if " kept in " in x)
    shutil.rmtree(kept, ignore_errors=True)
