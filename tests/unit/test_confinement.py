"""The confinement rules for the gate (apparmor/, selinux/) are read by the real tools:
AppArmor's parser compiles a libvirt domain profile that includes the snippet as the
local part of Debian's libvirt-qemu abstraction, and SELinux's module compiler and
packager build the module. A broken copy of each must fail, so the files are really read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SNIPPET = ROOT / "apparmor" / "libvirt-qemu.safeusb"
TE = ROOT / "selinux" / "safeusb.te"
FC = ROOT / "selinux" / "safeusb.fc"
SYSTEM_APPARMOR = Path("/etc/apparmor.d")
# What libvirt's virt-aa-helper writes for a domain (libvirt/TEMPLATE.qemu).
PROFILE = """#include <tunables/global>

profile libvirt-00000000-0000-0000-0000-000000000001 flags=(attach_disconnected) {
  #include <abstractions/libvirt-qemu>
}
"""


def tool(name: str, why: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        message = f"{name} is not installed ({why}; scripts/setup --test installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def apparmor_parse(tmp_path: Path, snippet: str) -> subprocess.CompletedProcess[str]:
    """Parse a domain profile, with Debian's abstraction and the snippet as its local part."""
    parser = tool("apparmor_parser", "Debian package apparmor")
    abstraction = SYSTEM_APPARMOR / "abstractions" / "libvirt-qemu"
    if not abstraction.exists():
        message = f"{abstraction} is missing (Debian package libvirt-daemon-system)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    base = tmp_path / "apparmor.d"
    (base / "local" / "abstractions").mkdir(parents=True)
    for name in ("abi", "tunables", "abstractions"):
        (base / name).symlink_to(SYSTEM_APPARMOR / name)
    (base / "local" / "abstractions" / "libvirt-qemu").write_text(snippet)
    profile = tmp_path / "profile"
    profile.write_text(PROFILE)
    return subprocess.run([parser, "-Q", "-K", "-b", str(base), "-I", str(base), str(profile)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_apparmor_snippet_parses_in_libvirts_qemu_abstraction(tmp_path: Path) -> None:
    done = apparmor_parse(tmp_path, SNIPPET.read_text())
    assert done.returncode == 0, done.stderr


def test_apparmor_parse_fails_on_a_broken_snippet(tmp_path: Path) -> None:
    done = apparmor_parse(tmp_path, SNIPPET.read_text() + "  /run/safeusb/x rwzq,\n")
    assert done.returncode != 0, "the snippet is not what the parser read"


def test_apparmor_snippet_allows_the_gate_and_the_socket() -> None:
    rules = [line.strip() for line in SNIPPET.read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    for rule in ("/usr/local/lib/safeusb/gate/** rix,", "/run/safeusb/safeusbd.sock rw,",
                 "/usr/bin/python3{,.[0-9]*} rix,"):
        assert rule in rules


def selinux_build(tmp_path: Path, te: str) -> subprocess.CompletedProcess[str]:
    checkmodule = tool("checkmodule", "Debian package checkpolicy")
    package = tool("semodule_package", "Debian package semodule-utils")
    (tmp_path / "safeusb.te").write_text(te)
    built = subprocess.run([checkmodule, "-M", "-m", "-o", str(tmp_path / "safeusb.mod"),
                            str(tmp_path / "safeusb.te")],
                           capture_output=True, text=True, timeout=120, check=False)
    if built.returncode != 0:
        return built
    return subprocess.run([package, "-o", str(tmp_path / "safeusb.pp"),
                           "-m", str(tmp_path / "safeusb.mod"), "-f", str(FC)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_selinux_module_compiles_and_packages(tmp_path: Path) -> None:
    done = selinux_build(tmp_path, TE.read_text())
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "safeusb.pp").stat().st_size > 0


def test_selinux_build_fails_on_a_broken_module(tmp_path: Path) -> None:
    done = selinux_build(tmp_path, TE.read_text() + "allow svirt_t undeclared_t:file read;\n")
    assert done.returncode != 0, "the module is not what checkmodule read"
