"""The libvirt hook: golden domain XML to decisions, the shell drop-in, installation."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from safeusb.domain import DomainInfo, policy_for_domain
from safeusb.handover.policy import Policy, PolicyError
from safeusb.hook import EXIT_REFUSED, handle
from safeusb.install import install, render, uninstall
from tests.unit.fakesys import FakeSystem

DOMAINS = Path(__file__).parent / "data" / "domains"


def _xml(name: str) -> bytes:
    return (DOMAINS / name).read_bytes()


def test_domain_parsing() -> None:
    assert DomainInfo.from_xml(_xml("none.xml")).hostdevs == ()
    assert DomainInfo.from_xml(_xml("pci.xml")).hostdevs == ()
    (by_id,) = DomainInfo.from_xml(_xml("by-id.xml")).hostdevs
    assert (by_id.vendor_id, by_id.product_id) == (0x46F4, 1)
    (by_addr,) = DomainInfo.from_xml(_xml("by-address.xml")).hostdevs
    assert (by_addr.bus, by_addr.device) == (2, 3)
    info = DomainInfo.from_xml(_xml("several.xml"))
    assert [h.startup_policy for h in info.hostdevs] == ["optional", None]
    assert info.policy == {"mount": "unmount", "flush_timeout": "30"}


def test_metadata_overrides_every_rule() -> None:
    base = Policy.from_text('[defaults]\nswap = "unmount"\n[[rules]]\nport = "2-1"\n'
                            'open = "force"\n')
    p = policy_for_domain(base, DomainInfo.from_xml(_xml("several.xml")))
    assert p.defaults.mount == "unmount" and p.defaults.swap == "unmount"
    assert p.defaults.flush_timeout == 30.0
    assert p.rules[0].settings.mount == "unmount" and p.rules[0].settings.open == "force"
    with pytest.raises(PolicyError) as exc:
        policy_for_domain(base, DomainInfo.from_xml(_xml("bad-metadata.xml")))
    assert "mount must be one of" in str(exc.value) and "g4" in str(exc.value)


def _run_hook(fs: FakeSystem, tmp_path: Path, name: str, op: str = "prepare",
              sub: str = "begin", policy: str | None = None) -> int:
    policy_path = tmp_path / "policy.toml"
    if policy is not None:
        policy_path.write_text(policy)
    return handle([name, op, sub, "-"], _xml(f"{name}.xml") if (DOMAINS / f"{name}.xml").exists()
                else name.encode(), fs.roots, str(policy_path), str(tmp_path / "state"))


def test_refusal_names_the_mountpoint_and_dirty_data(
    busy: FakeSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = _xml("by-id.xml")
    rc = handle(["g1", "prepare", "begin", "-"], xml, busy.roots, str(tmp_path / "none.toml"),
              str(tmp_path / "state"))
    err = capsys.readouterr().err
    assert rc == EXIT_REFUSED
    assert "no such file" in err  # an unreadable policy refuses a USB domain
    policy = tmp_path / "p.toml"
    policy.write_text("[defaults]\n")
    rc = handle(["g1", "prepare", "begin", "-"], xml, busy.roots, str(policy),
              str(tmp_path / "state"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_REFUSED
    assert any("/dev/sda mounted at /srv/photos" in line and 'set mount = "unmount"' in line
               for line in lines), lines
    assert any("with 4.0 MiB not yet written" in line for line in lines), lines
    assert all(line.startswith("safeusb: ") for line in lines)


@pytest.mark.parametrize("name", ["none.xml", "pci.xml"])
def test_domains_without_usb_pass_even_with_a_broken_policy(
    busy: FakeSystem, tmp_path: Path, name: str
) -> None:
    for op, sub in (("prepare", "begin"), ("release", "end"), ("start", "begin")):
        assert handle(["d", op, sub, "-"], _xml(name), busy.roots, "/nonexistent.toml",
                    str(tmp_path / "state")) == 0


def test_other_operations_never_refuse(busy: FakeSystem, tmp_path: Path) -> None:
    for op, sub in (("reconnect", "begin"), ("started", "begin"), ("stopped", "end"),
                    ("prepare", "end"), ("attach", "begin")):
        assert handle(["g1", op, sub, "-"], _xml("by-id.xml"), busy.roots, "/nonexistent.toml",
                    str(tmp_path / "state")) == 0


@pytest.mark.hostile
def test_unreadable_xml(busy: FakeSystem, tmp_path: Path) -> None:
    usb = b"<domain><devices><hostdev mode='subsystem' type='usb'><source>"
    assert handle(["x", "prepare", "begin", "-"], usb, busy.roots, "/n", str(tmp_path)) == 3
    evil = (b'<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/shadow">]><domain><devices>'
            b"<hostdev mode='subsystem' type='usb'><source><vendor id='&x;'/></source>"
            b"</hostdev></devices></domain>")
    assert handle(["x", "prepare", "begin", "-"], evil, busy.roots, "/n", str(tmp_path)) == 3
    assert handle(["x", "prepare", "begin", "-"], b"<domain><devices>", busy.roots, "/n",
                str(tmp_path)) == 0


def test_missing_device_is_left_to_libvirt(busy: FakeSystem, tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("[defaults]\n")
    xml = _xml("by-id.xml").replace(b"0x46f4", b"0x1111")
    assert handle(["g1", "prepare", "begin", "-"], xml, busy.roots, str(policy),
                str(tmp_path / "state")) == 0


# -- the shell drop-in -------------------------------------------------------------------


def _dropin(tmp_path: Path, python: str) -> Path:
    path = tmp_path / "safeusb-hook"
    path.write_text(render(python))
    path.chmod(0o755)
    return path


def _call(hook_path: Path, args: list[str], xml: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(hook_path), *args], input=xml, capture_output=True,
                          timeout=60, check=False, env={"PATH": "/usr/bin:/bin"})


def test_dropin_passes_xml_through_for_migrate_and_restore(tmp_path: Path) -> None:
    hook_path = _dropin(tmp_path, "/nonexistent/python")
    xml = _xml("by-id.xml")
    for op in ("migrate", "restore"):
        p = _call(hook_path, ["g1", op, "begin", "-"], xml)
        assert p.returncode == 0 and p.stdout == xml


@pytest.mark.hostile
def test_dropin_with_broken_python(tmp_path: Path) -> None:
    hook_path = _dropin(tmp_path, "/nonexistent/python")
    for name in ("none.xml", "pci.xml"):
        assert _call(hook_path, ["d", "prepare", "begin", "-"], _xml(name)).returncode == 0
    p = _call(hook_path, ["g1", "prepare", "begin", "-"], _xml("by-id.xml"))
    assert p.returncode == 1 and b"refusing to start" in p.stderr
    assert _call(hook_path, ["g1", "release", "end", "-"], _xml("by-id.xml")).returncode == 0


def test_install_is_idempotent_and_never_overwrites(tmp_path: Path) -> None:
    first = install(str(tmp_path), "/usr/bin/python3")
    assert first.changed and os.access(first.path, os.X_OK)
    assert not install(str(tmp_path), "/usr/bin/python3").changed
    assert install(str(tmp_path), "/opt/py/bin/python3").changed
    assert uninstall(str(tmp_path)).changed and not Path(first.path).exists()
    assert not uninstall(str(tmp_path)).changed
    foreign = Path(first.path)
    foreign.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(Exception, match="not safeusb's hook"):
        install(str(tmp_path), "/usr/bin/python3")
    assert not (tmp_path / "etc/libvirt/hooks/qemu").exists()



def test_packaged_dropin_names_the_target_system_and_goes_inert_when_removed(
        tmp_path: Path) -> None:
    """install-hook --site (what a package build runs): the drop-in names the target's
    directories, not this checkout's, and once the package's code is gone (dpkg -r keeps
    conffiles) it lets every domain start without running Python; while the code is
    there a USB domain still goes to Python and fails closed when Python is broken."""
    site = tmp_path / "site"
    done = install(str(tmp_path / "root"), "/nonexistent/python", sites=[str(site)])
    text = Path(done.path).read_text()
    assert f"PACKAGE = {str(site / 'safeusb')!r}" in text
    assert f"CODE_DIRS = {[str(site)]!r}" in text
    assert str(Path(__file__).resolve().parents[2]) not in text
    hook_path = Path(done.path)
    p = _call(hook_path, ["g1", "prepare", "begin", "-"], _xml("by-id.xml"))
    assert p.returncode == 0 and p.stderr == b""
    (site / "safeusb").mkdir(parents=True)
    (site / "safeusb" / "hook.py").write_text("")
    p = _call(hook_path, ["g1", "prepare", "begin", "-"], _xml("by-id.xml"))
    assert p.returncode == 1 and b"refusing to start" in p.stderr
    assert _call(hook_path, ["d", "prepare", "begin", "-"], _xml("none.xml")).returncode == 0
    with pytest.raises(Exception, match="normalized absolute path"):
        install(str(tmp_path / "root"), "/usr/bin/python3", sites=["usr/lib/python3"])
    with pytest.raises(Exception, match="without special characters"):
        install(str(tmp_path / "root"), "/usr/bin/python3", sites=["/usr/lib/p y"])


@pytest.mark.hostile
def test_hostile_domain_documents(busy: FakeSystem, tmp_path: Path) -> None:
    usb = b"<hostdev mode='subsystem' type='usb'><source><vendor id='0x46f4'/>" \
          b"<product id='0x0001'/></source></hostdev>"
    huge = b"<domain><name>x</name><devices>" + usb + b"<!--" + b"x" * (100 * 1024 * 1024)
    assert handle(["x", "prepare", "begin", "-"], huge, busy.roots, "/n", str(tmp_path)) == 3
    assert handle(["x", "prepare", "begin", "-"], huge.replace(b"type='usb'", b"type='pci'"),
                busy.roots, "/n", str(tmp_path)) == 0
    bad_utf8 = b"<domain><name>\xff\xfe</name><devices>" + usb + b"</devices></domain>"
    assert handle(["x", "prepare", "begin", "-"], bad_utf8, busy.roots, "/n", str(tmp_path)) == 3
    negative = usb.replace(b"0x46f4", b"-1")
    doc = b"<domain><name>x</name><devices>" + negative + b"</devices></domain>"
    assert handle(["x", "prepare", "begin", "-"], doc, busy.roots, "/n", str(tmp_path)) == 3


@pytest.mark.hostile
def test_thousands_of_hostdevs_and_duplicates(busy: FakeSystem, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("[defaults]\n")
    one = (b"<hostdev mode='subsystem' type='usb'><source><address bus='9' device='%d'/>"
           b"</source></hostdev>")
    many = b"".join(one % i for i in range(1, 3001))
    doc = b"<domain><name>x</name><devices>" + many + b"</devices></domain>"
    assert handle(["x", "prepare", "begin", "-"], doc, busy.roots, str(policy),
                str(tmp_path / "s")) == 0  # none of them exists: libvirt reports that
    dup = _xml("by-id.xml").replace(b"</devices>",
                                    b"<hostdev mode='subsystem' type='usb'><source>"
                                    b"<vendor id='0x46f4'/><product id='0x0001'/></source>"
                                    b"</hostdev></devices>")
    assert handle(["g1", "prepare", "begin", "-"], dup, busy.roots, str(policy),
                str(tmp_path / "s")) == 3
    assert "mounted at /srv/photos" in capsys.readouterr().err


def test_metadata_sets_network_like_the_policy_file() -> None:
    """`network` is a per-domain setting like the others: <safeusb:policy network="down"/>
    overrides the policy file's, and a value the file would refuse is refused."""
    base = Policy.from_text('[defaults]\nmount = "unmount"\n')
    xml = (b'<domain><name>g5</name><metadata><safeusb:policy '
           b'xmlns:safeusb="https://safeusb.invalid/xmlns/1" network="%s"/></metadata>'
           b'<devices/></domain>')
    p = policy_for_domain(base, DomainInfo.from_xml(xml % b"down"))
    assert p.defaults.network == "down" and p.defaults.mount == "unmount"
    with pytest.raises(PolicyError) as exc:
        policy_for_domain(base, DomainInfo.from_xml(xml % b"unplug"))
    assert "network must be one of refuse, down" in str(exc.value) and "g5" in str(exc.value)
