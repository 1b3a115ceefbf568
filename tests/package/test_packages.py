"""The packages a distribution would ship, built from this checkout outside it: the .deb
(lintian-clean, the layout and the hook the issue asks for), the wheel and sdist (a
fresh virtual environment outside any checkout runs the hook from them), the RPMs.
The real-kernel tier installs the .deb in a guest (tests/vm/test_package_vm.py)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.packaging import ROOT, SYSTEM_PATH, Packages, missing_tools

pytestmark = pytest.mark.package

SITE = "/usr/lib/python3/dist-packages"
USB_DOMAIN = (b"<domain><name>g</name><devices><hostdev mode='subsystem' type='usb'>"
              b"<source><vendor id='0x1111'/><product id='0x0001'/></source></hostdev>"
              b"</devices></domain>")
NOBODY = 65534


def need(kind: str) -> None:
    missing = missing_tools(kind)
    if missing:
        why = f"cannot build the {kind} packages: {', '.join(missing)} missing " \
              "(scripts/setup --test installs them)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


def deb_files(deb: Path) -> dict[str, tarfile.TarInfo]:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.removeprefix("."): m for m in tar.getmembers()}


def deb_read(deb: Path, path: str) -> str:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        f = tar.extractfile(f".{path}")
        assert f is not None, path
        return f.read().decode()


def deb_control(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-I", str(deb), name], capture_output=True,
                          text=True, check=True).stdout


def rules_sets() -> list[str]:
    return sorted(p.name.removesuffix(".safeusb") for p in (ROOT / "apparmor").glob("*.safeusb"))


def check_hook(text: str, python: str, package: str) -> None:
    """A drop-in rendered for the target system: its interpreter, its package directory,
    nothing of this checkout, inert once the package is gone."""
    assert text.startswith("#!/bin/sh\n# safeusb: libvirt QEMU hook")
    assert f"| {python} -I -S -c \"$boot\"" in text
    assert f"PACKAGE = {package!r}" in text
    assert f"[ -f {package}/hook.py ] || exit 0" in text
    assert str(ROOT) not in text and ".venv" not in text and "@" + "BOOT@" not in text


def test_deb_builds_lintian_clean(packages: Packages) -> None:
    need("deb")
    tags = [line for line in packages.lintian.splitlines()
            if re.match(r"[EWIPX]: ", line)]
    assert not tags, "lintian:\n" + packages.lintian


def test_deb_layout(packages: Packages) -> None:
    need("deb")
    deb = packages.deb
    files = deb_files(deb)
    for path in ("/usr/bin/safeusb", "/usr/bin/safeusbd", "/usr/bin/safeusb-qemu-gate",
                 f"{SITE}/safeusb/hook.py", f"{SITE}/safeusb/libvirt_hook.in",
                 "/lib/systemd/system/safeusbd.service", "/lib/systemd/system/safeusbd.socket",
                 "/usr/lib/tmpfiles.d/safeusb.conf", "/usr/share/man/man1/safeusb.1.gz",
                 "/usr/share/man/man8/safeusbd.8.gz", "/usr/share/man/man8/safeusb-qemu-gate.8.gz",
                 "/usr/share/doc/safeusb/examples/policy-sticks.toml",
                 "/usr/share/doc/safeusb/examples/policy-refuse.toml"):
        assert path in files, f"{path} is not in {deb.name}"
    assert not [p for p in files if "/tests/" in p or p.endswith("/tests")]
    hook = files["/etc/libvirt/hooks/qemu.d/safeusb"]
    assert (hook.uid, hook.gid, hook.mode) == (0, 0, 0o755)
    check_hook(deb_read(deb, "/etc/libvirt/hooks/qemu.d/safeusb"), "/usr/bin/python3",
               f"{SITE}/safeusb")
    conffiles = deb_control(deb, "conffiles").split()
    assert "/etc/libvirt/hooks/qemu.d/safeusb" in conffiles
    assert rules_sets(), "apparmor/ holds no rule set"
    for name in rules_sets():  # every rule set in apparmor/, by rule
        path = f"/etc/apparmor.d/abstractions/safeusb/{name}"
        assert path in conffiles
        assert deb_read(deb, path) == (ROOT / "apparmor" / f"{name}.safeusb").read_text()
    assert "ExecStart=/usr/bin/safeusbd\n" in deb_read(deb, "/lib/systemd/system/safeusbd.service")
    control = deb_control(deb, "control")
    depends = re.search(r"^Depends: (.*)$", control, re.M)
    assert depends is not None
    for dep in ("python3-libvirt", "python3-lxml", "python3-pyroute2", "python3-pyudev"):
        assert dep in depends.group(1).split(", ")
    postinst = deb_control(deb, "postinst")
    assert "deb-systemd-helper enable 'safeusbd.socket'" in postinst
    assert "restart it" in postinst
    assert "'safeusb install-confinement' before 'safeusb protect'" in postinst
    # It says so (in its messages); it never restarts or signals libvirtd itself.
    code = re.sub(r'"[^"]*"', '""', postinst)
    assert not re.search(r"(systemctl|deb-systemd-invoke|invoke-rc\.d|service|kill)\b[^\n]*"
                         r"(libvirtd|virtqemud|\$running)", code)
    assert re.search(r"systemctl restart \$running", postinst)


def test_wheel_and_sdist_outside_any_checkout(packages: Packages, tmp_path: Path) -> None:
    """pip install of the wheel into a fresh virtual environment (the distribution's
    libvirt, lxml, pyroute2, pyudev beside it), then install-hook with the system's
    Python: the drop-in runs the hook from that environment when root alone can change
    it, and refuses once someone else owns it."""
    need("dist")
    wheel, sdist = packages.wheel, packages.sdist
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "safeusb/libvirt_hook.in" in names and "safeusb/trust.py" in names
    with tarfile.open(sdist) as tar:
        snames = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for path in ("packaging/safeusb.spec", "selinux/safeusb.te", "systemd/safeusbd.socket",
                 "docs/safeusbd.8", *(f"apparmor/{n}.safeusb" for n in rules_sets())):
        assert path in snames, f"{path} is not in {sdist.name}"

    venv = tmp_path / "venv"
    env = {"PATH": SYSTEM_PATH, "HOME": str(tmp_path)}
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, env=env, cwd="/")
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index",
                    "--disable-pip-version-check", str(wheel)], check=True, env=env, cwd="/")
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import safeusb; print(safeusb.__file__)"], capture_output=True,
                           text=True, check=True, env=env, cwd="/").stdout.strip()
    assert where.startswith(str(venv)) and not where.startswith(str(ROOT))
    root = tmp_path / "root"
    done = subprocess.run([str(venv / "bin" / "safeusb"), "install-hook", "--root", str(root),
                           "--python", "/usr/bin/python3"], capture_output=True, text=True,
                          env=env, cwd="/", check=False)
    assert done.returncode == 0, done.stderr
    hook = root / "etc/libvirt/hooks/qemu.d/safeusb"
    text = hook.read_text()
    assert "/usr/bin/python3 -I -S" in text and str(ROOT) not in text
    assert f"PACKAGE = {where.removesuffix('/__init__.py')!r}" in text

    def run_hook() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(hook), "g", "prepare", "begin", "-"], input=USB_DOMAIN,
                              capture_output=True, env={"PATH": SYSTEM_PATH}, cwd="/",
                              check=False, timeout=120)

    if os.geteuid() != 0:
        pytest.skip("the trust check of the hook needs root-owned files (run as root)")
    tmp_path.chmod(0o755)
    ran = run_hook()
    # The hook ran from the environment: a USB device that is not on this host is
    # left to libvirt (exit 0) with safeusb's own words.
    assert ran.returncode == 0, ran.stderr
    assert b"1111:0001 is not on the host" in ran.stderr
    os.chown(venv / "lib", NOBODY, -1)
    refused = run_hook()
    assert refused.returncode == 1
    assert b"refusing to run code that others can change" in refused.stderr
    assert b"is owned by" in refused.stderr


#: Run in the installed environment: where the demo's harness, its guest files and the
#: commands the guest runs resolve, and what the guest's environment would say.
RESOLVE = """
import json, sys, tempfile
from pathlib import Path
from safeusb import demo
from safeusb.lab import harness
share = Path(tempfile.mkdtemp(prefix="safeusb-demo-plan-")) / "share"
(share / "out").mkdir(parents=True)
boot = demo.demo_boot()
harness._write_plan(share, boot, harness.LAB_GUEST)
env = dict(line.split("=", 1) for line in (share / "boot.env").read_text().splitlines())
try:
    argv = harness.vng_command(boot, share.parent)
except harness.VmUnavailable:
    argv = None
print(json.dumps({
    "harness": harness.__file__, "repo": None if harness.REPO is None else str(harness.REPO),
    "lab": str(harness.LAB_GUEST), "share": str(share), "argv": argv,
    "env": {k: v.strip("'") for k, v in env.items()},
    "scenarios": {p.name: p.read_text() for p in sorted((share / "scenarios").iterdir())},
    "lib": (share / "lib.sh").read_text(), "missing": demo.missing_prerequisites(),
}))
"""


def test_demo_resolves_from_an_installed_wheel(packages: Packages, tmp_path: Path) -> None:
    """`safeusb demo` from a wheel in a fresh virtual environment, run from /: its
    harness, guest files and the commands the guest runs are the installed ones, and
    what it lacks it names with where it looked."""
    need("dist")
    venv = tmp_path / "venv"
    env = {"PATH": SYSTEM_PATH, "HOME": str(tmp_path)}
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, env=env, cwd="/")
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index",
                    "--disable-pip-version-check", str(packages.wheel)], check=True,
                   env=env, cwd="/")
    bin_dir = venv / "bin"

    def resolve() -> dict[str, Any]:
        out = subprocess.run([str(bin_dir / "python"), "-c", RESOLVE], capture_output=True,
                             text=True, env=env, cwd="/", check=True).stdout
        return dict(json.loads(out))

    if shutil.which("vng", path=SYSTEM_PATH) is None:
        # No virtme-ng anywhere: the demo stops before booting and says where it looked.
        demo = subprocess.run([str(bin_dir / "safeusb"), "demo"], capture_output=True,
                              text=True, env=env, cwd="/", check=False, timeout=60)
        assert demo.returncode == 2, demo.stderr
        assert f"vng not found in {bin_dir}, /usr/sbin, /sbin or PATH (virtme-ng: " \
               in demo.stderr, demo.stderr
        assert str(ROOT) not in demo.stderr and "tests/vm" not in demo.stderr
        assert "scripts/setup-vm-tier" not in demo.stderr  # a checkout's script
        assert "vng not found" in " ".join(resolve()["missing"])

    # virtme-ng installed beside safeusb (pip install virtme-ng into the environment).
    vng = bin_dir / "vng"
    vng.write_text("#!/bin/sh\nexit 1\n")
    vng.chmod(0o755)
    got = resolve()
    site = next((venv / "lib").glob("python3*/site-packages"))
    lab = site / "safeusb" / "lab" / "guest"
    assert got["harness"] == str(site / "safeusb" / "lab" / "harness.py")
    assert got["repo"] is None and got["lab"] == str(lab)
    assert not [m for m in got["missing"] if "vng" in m or str(ROOT) in m], got["missing"]
    assert got["env"]["SAFEUSB"] == str(bin_dir / "safeusb")
    assert got["env"]["SAFEUSBD_CMD"] == str(bin_dir / "safeusbd")
    assert got["env"]["PYTHON"] == str(bin_dir / "python")
    assert got["env"]["LAB_DIR"] == got["env"]["GUEST_DIR"] == str(lab)
    assert got["env"]["REPO"] == ""
    assert got["scenarios"] == {
        "guarded.sh": (lab / "demo-guarded.sh").read_text(),
        "plain.sh": (lab / "demo-plain.sh").read_text()}
    assert got["scenarios"]["plain.sh"] == \
        (ROOT / "safeusb" / "lab" / "guest" / "demo-plain.sh").read_text()
    assert got["lib"] == (lab / "lib.sh").read_text()
    for name in ("driver.sh", "libvirt-up.sh", "stock-up.sh", "g1.xml"):
        assert (lab / name).is_file(), name
    if got["argv"] is not None:  # a Debian kernel in /boot: the boot's command line
        assert got["argv"][0] == str(vng)
        assert got["argv"][-1] == f"bash {lab / 'driver.sh'} {got['share']}"


def test_rpms_build_with_the_same_layout(packages: Packages) -> None:
    need("dist")
    need("rpm")
    rpms = {p.name.split("-0")[0]: p for p in packages.rpms}
    assert set(rpms) == {"safeusb", "safeusb-selinux"}, rpms

    def listing(rpm: Path) -> list[str]:
        return subprocess.run(["rpm", "-qlp", str(rpm)], capture_output=True, text=True,
                              check=True, env={"PATH": SYSTEM_PATH}).stdout.split()

    main = listing(rpms["safeusb"])
    site = next(p for p in main if p.endswith("/safeusb/hook.py")).removesuffix("/safeusb/hook.py")
    assert re.fullmatch(r"/usr/lib/python3\.\d+/site-packages", site), site
    for path in ("/usr/bin/safeusb", "/usr/bin/safeusbd", "/usr/bin/safeusb-qemu-gate",
                 "/etc/libvirt/hooks/qemu.d/safeusb", "/usr/lib/systemd/system/safeusbd.socket",
                 "/usr/lib/systemd/system/safeusbd.service", "/usr/lib/tmpfiles.d/safeusb.conf",
                 "/usr/share/man/man8/safeusbd.8",
                 *(f"/etc/apparmor.d/abstractions/safeusb/{n}" for n in rules_sets())):
        assert path in main, f"{path} is not in {rpms['safeusb'].name}"
    assert listing(rpms["safeusb-selinux"]) == ["/usr/share/selinux/packages/safeusb.pp"]
    configs = subprocess.run(["rpm", "-qcp", str(rpms["safeusb"])], capture_output=True,
                             text=True, check=True).stdout.split()
    assert "/etc/libvirt/hooks/qemu.d/safeusb" in configs
    extract = Path(packages.workdir) / "rpm" / "extract"
    extract.mkdir(exist_ok=True)
    with subprocess.Popen(["rpm2cpio", str(rpms["safeusb"])], stdout=subprocess.PIPE) as p2c:
        subprocess.run(["cpio", "-idm", "--quiet", "./etc/libvirt/hooks/qemu.d/safeusb"],
                       stdin=p2c.stdout, cwd=extract, check=True)
    check_hook((extract / "etc/libvirt/hooks/qemu.d/safeusb").read_text(), "/usr/bin/python3",
               f"{site}/safeusb")
