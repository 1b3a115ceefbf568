"""libvirt USB <hostdev> elements, read safely (no entities, no DTD, no network)."""

from __future__ import annotations

from lxml import etree

from safeusb.errors import XMLError
from safeusb.values import frozen

MAX_XML_BYTES = 4 * 1024 * 1024


def parse_c_uint(text: str, limit: int) -> int:
    """Parse a number as libvirt does (strtoul with base 0: 0x hex, leading 0 octal)."""
    t = text.strip()
    if not t or t.startswith(("-", "+")):
        raise ValueError(f"not an unsigned number: {text!r}")
    try:
        if t.lower().startswith("0x"):
            value = int(t[2:], 16)
        elif len(t) > 1 and t.startswith("0"):
            value = int(t[1:], 8)
        else:
            value = int(t, 10)
    except ValueError:
        raise ValueError(f"not an unsigned number: {text!r}") from None
    if value > limit:
        raise ValueError(f"out of range: {text!r}")
    return value


def safe_parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def parse_xml(data: bytes, source: str, limit: int = MAX_XML_BYTES) -> etree._Element:
    if len(data) > limit:
        raise XMLError(source, f"larger than {limit} bytes")
    if b"<!ENTITY" in data or b"<!DOCTYPE" in data:
        raise XMLError(source, "document type declarations are not accepted")
    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as exc:
        raise XMLError(source, f"not well-formed XML: {exc}") from None
    if root is None:
        raise XMLError(source, "empty document")
    return root


@frozen
class UsbHostdev:
    """A <hostdev mode='subsystem' type='usb'> source: vendor/product and/or bus/device."""

    vendor_id: int | None = None
    product_id: int | None = None
    bus: int | None = None
    device: int | None = None
    startup_policy: str | None = None

    @classmethod
    def from_element(cls, el: etree._Element, source: str) -> UsbHostdev:
        src = el.find("source")
        if src is None:
            raise XMLError(source, "<hostdev type='usb'> has no <source>")

        def num(path: str, attr: str, limit: int) -> int | None:
            child = src.find(path)
            if child is None:
                return None
            value = child.get(attr)
            if value is None:
                raise XMLError(source, f"<{path}> has no {attr}=")
            try:
                return parse_c_uint(value, limit)
            except ValueError as exc:
                raise XMLError(source, f"<{path} {attr}=...>: {exc}") from None

        vendor = num("vendor", "id", 0xFFFF)
        product = num("product", "id", 0xFFFF)
        bus = num("address", "bus", 0xFFFF)
        device = num("address", "device", 0xFFFF)
        if (vendor is None) != (product is None):
            raise XMLError(source, "<source> needs both <vendor> and <product>, or neither")
        if (bus is None) != (device is None):
            raise XMLError(source, "<address> needs both bus= and device=")
        if vendor is None and bus is None:
            raise XMLError(source, "<source> names no device (no vendor/product, no address)")
        return cls(vendor, product, bus, device, src.get("startupPolicy"))

    def describe(self) -> str:
        parts = []
        if self.vendor_id is not None and self.product_id is not None:
            parts.append(f"{self.vendor_id:04x}:{self.product_id:04x}")
        if self.bus is not None and self.device is not None:
            parts.append(f"bus {self.bus} device {self.device}")
        return "USB host device " + " at ".join(parts)


def _is_usb_hostdev(el: etree._Element) -> bool:
    return el.tag == "hostdev" and el.get("mode", "subsystem") == "subsystem" and (
        el.get("type") == "usb"
    )


def usb_hostdevs(data: bytes, source: str) -> tuple[UsbHostdev, ...]:
    """Every USB host device in a <hostdev> element or in a whole <domain>."""
    root = parse_xml(data, source)
    if root.tag == "hostdev":
        if not _is_usb_hostdev(root):
            raise XMLError(source, "not a <hostdev mode='subsystem' type='usb'> element")
        return (UsbHostdev.from_element(root, source),)
    found = [el for el in root.iter("hostdev") if _is_usb_hostdev(el)]
    return tuple(UsbHostdev.from_element(el, source) for el in found)
