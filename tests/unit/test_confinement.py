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

from safeusb import confinement

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


# safeusb install-confinement: the rules it renders and where it puts them


def test_the_shipped_rules_are_what_install_confinement_renders_for_system_paths() -> None:
    blocks = confinement.render(None)
    for name, rel in (("libvirt-qemu.safeusb", confinement.QEMU_LOCAL),
                      ("usr.sbin.libvirtd.safeusb", confinement.LIBVIRTD_LOCAL)):
        text = (ROOT / "apparmor" / name).read_text()
        body = "".join(line for line in text.splitlines(keepends=True)
                       if not line.startswith("#")).lstrip("\n")
        assert body == blocks[rel], f"apparmor/{name} differs from the rendered rules"


def test_rules_for_a_virtual_environment_parse_and_name_its_paths(tmp_path: Path) -> None:
    paths = confinement.Paths(gate="/opt/su env/bin/safeusb-qemu-gate",
                              python="/opt/py[3]/bin/python3.11",
                              read_only=("/opt/su env", "/usr/lib/python3/dist-packages",
                                         "/srv/checkout"))
    qemu = confinement.render(paths)[confinement.QEMU_LOCAL]
    assert '"/opt/su env/bin/safeusb-qemu-gate" rix,' in qemu
    assert "/opt/py\\[3\\]/bin/python3.11 rix," in qemu  # a literal, not a pattern
    assert "  /srv/checkout/** r,\n  deny /srv/checkout/** w," in qemu
    assert "dist-packages" not in qemu  # the general rules cover the system's Python
    done = apparmor_parse(tmp_path, qemu)
    assert done.returncode == 0, done.stderr


def test_install_and_uninstall_keep_the_admins_own_rules(tmp_path: Path) -> None:
    local = tmp_path / "etc/apparmor.d" / confinement.QEMU_LOCAL
    local.parent.mkdir(parents=True)
    local.write_text("  # the admin's\n  /srv/isos/** r,\n")
    paths = confinement.Paths("/usr/local/bin/safeusb-qemu-gate", "/usr/bin/python3.11", ())
    first = confinement.install(str(tmp_path), paths, reload=False)
    assert all(line.startswith("installed") for line in first), first
    text = local.read_text()
    assert text.startswith("  # the admin's\n  /srv/isos/** r,\n" + confinement.BEGIN)
    assert confinement.installed(str(tmp_path))
    again = confinement.install(str(tmp_path), paths, reload=False)
    assert all("already up to date" in line for line in again) and local.read_text() == text
    libvirtd = tmp_path / "etc/apparmor.d" / confinement.LIBVIRTD_LOCAL
    assert "/usr/local/bin/safeusb-qemu-gate PUx," in libvirtd.read_text()
    confinement.uninstall(str(tmp_path))
    assert local.read_text() == "  # the admin's\n  /srv/isos/** r,\n"
    assert not confinement.installed(str(tmp_path)) and libvirtd.read_text() == ""


def test_an_unfinished_block_is_left_for_the_admin(tmp_path: Path) -> None:
    local = tmp_path / "etc/apparmor.d" / confinement.QEMU_LOCAL
    local.parent.mkdir(parents=True)
    local.write_text(confinement.BEGIN + "\n  /x r,\n")
    with pytest.raises(confinement.ConfinementError, match="unfinished"):
        confinement.uninstall(str(tmp_path))
    assert local.read_text() == confinement.BEGIN + "\n  /x r,\n"


CAPS = b"""<capabilities><host><uuid>x</uuid>
<secmodel><model>apparmor</model><doi>0</doi></secmodel>
<secmodel><model>dac</model><doi>0</doi></secmodel></host></capabilities>"""


def test_protect_refuses_under_apparmor_until_the_rules_are_installed(tmp_path: Path) -> None:
    models = confinement.libvirt_security_models(CAPS)
    assert models == ("apparmor", "dac")
    refusal, _ = confinement.advice(models, str(tmp_path))
    assert refusal and "safeusb install-confinement" in refusal
    confinement.install(str(tmp_path), confinement.Paths("/usr/bin/safeusb-qemu-gate",
                                                         "/usr/bin/python3", ()), reload=False)
    refusal, notes = confinement.advice(models, str(tmp_path))
    assert refusal is None and any("AppArmor" in n for n in notes)
    assert confinement.advice(("dac",), str(tmp_path / "none")) == (None, [])
    refusal, notes = confinement.advice(("selinux", "dac"), str(tmp_path / "none"))
    assert refusal is None and "selinux/safeusb.te" in notes[0]
