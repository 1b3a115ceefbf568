"""libvirt <hostdev> XML: safe parsing of hostile input, libvirt's number syntax."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safeusb.errors import XMLError
from safeusb.hostdev import UsbHostdev, parse_c_uint, usb_hostdevs

BY_ID = b"""<hostdev mode='subsystem' type='usb' managed='yes'>
  <source startupPolicy='optional'><vendor id='0x46f4'/><product id='0x0001'/></source>
</hostdev>"""
BY_ADDR = b"""<hostdev mode='subsystem' type='usb'>
  <source><address bus='2' device='3'/></source></hostdev>"""


def test_by_vendor_product() -> None:
    (h,) = usb_hostdevs(BY_ID, "t.xml")
    assert h == UsbHostdev(0x46F4, 0x0001, None, None, "optional")


def test_by_address() -> None:
    (h,) = usb_hostdevs(BY_ADDR, "t.xml")
    assert (h.bus, h.device) == (2, 3)


def test_domain_with_mixed_devices() -> None:
    doc = b"""<domain type='kvm'><name>g</name><devices>
      <hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0'
       function='0'/></source></hostdev>""" + BY_ID + BY_ADDR + b"</devices></domain>"
    assert len(usb_hostdevs(doc, "d.xml")) == 2
    assert usb_hostdevs(b"<domain><devices/></domain>", "d.xml") == ()


def test_libvirt_number_syntax() -> None:
    assert parse_c_uint("0x46f4", 0xFFFF) == 0x46F4
    assert parse_c_uint("010", 0xFFFF) == 8
    assert parse_c_uint("12", 0xFFFF) == 12
    for bad in ("-1", "+1", "", "0xzz", "46f4", "0x10000", "09"):
        with pytest.raises(ValueError):
            parse_c_uint(bad, 0xFFFF)


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<hostdev mode='subsystem' type='usb'><source><vendor id='&lol3;'/></source></hostdev>"""
XXE = b"""<?xml version="1.0"?><!DOCTYPE h [<!ENTITY x SYSTEM "file:///etc/shadow">]>
<hostdev mode='subsystem' type='usb'><source><vendor id='&x;'/><product id='1'/></source>
</hostdev>"""


@pytest.mark.parametrize(("doc", "message"), [
    (BILLION_LAUGHS, "document type"),
    (XXE, "document type"),
    (b"<hostdev mode='subsystem' type='usb'><source>", "not well-formed"),
    (b"<hostdev mode='subsystem' type='usb'><source><vendor id='-1'/><product id='1'/>"
     b"</source></hostdev>", "unsigned"),
    (b"<hostdev mode='subsystem' type='usb'><source><address bus='../2' device='3'/>"
     b"</source></hostdev>", "unsigned"),
    (b"<hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev>",
     "both"),
    (b"<hostdev mode='subsystem' type='pci'/>", "not a <hostdev"),
    (b"\xff\xfe<hostdev/>", "not well-formed"),
    (b"<a>" * 10 + b"x" * (5 * 1024 * 1024), "larger than"),
])
@pytest.mark.hostile
def test_hostile_or_broken(doc: bytes, message: str) -> None:
    with pytest.raises(XMLError) as exc:
        usb_hostdevs(doc, "evil.xml")
    assert message in str(exc.value) and str(exc.value).startswith("evil.xml: ")
    assert "\n" not in str(exc.value).strip()


@given(st.binary(max_size=500))
@pytest.mark.hostile
def test_arbitrary_bytes_give_xml_error_or_result(data: bytes) -> None:
    try:
        usb_hostdevs(data, "fuzz.xml")
    except XMLError:
        pass
