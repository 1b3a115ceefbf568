"""protect/unprotect as pure transforms of domain XML, against golden files."""

from __future__ import annotations

from pathlib import Path

import pytest

from safeusb.errors import SafeUSBError, XMLError
from safeusb.hostdev import parse_xml
from safeusb.protect import ProtectError, protect_xml, real_emulator, to_text, unprotect_xml

DATA = Path(__file__).parent / "data" / "protect"


def load(name: str):  # type: ignore[no-untyped-def]
    return parse_xml((DATA / name).read_bytes(), name)


@pytest.mark.parametrize("name", ["plain", "with-metadata"])
def test_protect_matches_golden_and_unprotect_restores(name: str) -> None:
    protected = protect_xml(load(f"{name}.xml"))
    assert to_text(protected) + "\n" == (DATA / f"{name}.protected.xml").read_text()
    restored = unprotect_xml(load(f"{name}.protected.xml"))
    assert to_text(restored) == to_text(load(f"{name}.xml"))


def test_real_emulator_is_kept_in_safeusb_metadata() -> None:
    root = load("plain.protected.xml")
    assert real_emulator(root) == "/usr/bin/qemu-system-x86_64"
    assert root.findtext("devices/emulator") == (
        "/usr/local/lib/safeusb/gate/usr/bin/qemu-system-x86_64")


def test_protect_refuses_to_stack() -> None:
    with pytest.raises(ProtectError, match="already protected"):
        protect_xml(load("plain.protected.xml"))
    root = load("plain.xml")
    el = root.find("devices/emulator")
    assert el is not None
    el.text = "/usr/local/lib/safeusb/gate/usr/bin/qemu-system-x86_64"
    with pytest.raises(ProtectError, match="already protected"):
        protect_xml(root)


def test_unprotect_refuses_unprotected_and_changed_domains() -> None:
    with pytest.raises(ProtectError, match="not protected"):
        unprotect_xml(load("plain.xml"))
    root = load("plain.protected.xml")
    el = root.find("devices/emulator")
    assert el is not None
    el.text = "/opt/other-qemu"
    with pytest.raises(ProtectError, match="fix <emulator> by hand"):
        unprotect_xml(root)


@pytest.mark.parametrize("xml", [
    b"<domain><name>x</name></domain>",
    b"<domain><devices><emulator>qemu</emulator></devices></domain>",
    b"<domain><devices><emulator>/usr/bin/../bin/qemu</emulator></devices></domain>",
    b"<network/>",
])
def test_protect_refuses_domains_without_a_usable_emulator(xml: bytes) -> None:
    with pytest.raises(SafeUSBError):
        protect_xml(parse_xml(xml, "t"))


def test_entities_are_never_expanded() -> None:
    with pytest.raises(XMLError):
        parse_xml(b'<!DOCTYPE d [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                  b"<domain><devices><emulator>&e;</emulator></devices></domain>", "t")
