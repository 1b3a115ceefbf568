"""`safeusb protect DOMAIN`: put the gate in as the domain's emulator; `unprotect` undoes it.

The domain's `<emulator>` becomes the gate's launcher for the real emulator,
GATE_ROOT + its path (`/usr/local/lib/safeusb/gate/usr/bin/qemu-system-x86_64`, a
symlink to `safeusb-qemu-gate`), and the real path is kept in the domain's own metadata:

    <metadata>
      <safeusb:gate xmlns:safeusb="https://safeusb.invalid/xmlns/1">
        <safeusb:emulator>/usr/bin/qemu-system-x86_64</safeusb:emulator>
      </safeusb:gate>
    </metadata>

The XML transforms are pure; the libvirt calls and the launcher symlink are the thin layer
at the end. A running domain keeps its QEMU: the new emulator takes effect at next start.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

from lxml import etree

from safeusb import confinement, trust
from safeusb.errors import EXIT_IN_USE, LibvirtError, SafeUSBError, UsageError
from safeusb.gate.launcher import GATE_ROOT, is_gate_path, launcher_path
from safeusb.gate.proxy import PROG
from safeusb.host import files
from safeusb.host.virt import Connection, Domain, VirtError
from safeusb.hostdev import parse_xml

NS = "https://safeusb.invalid/xmlns/1"
_GATE = f"{{{NS}}}gate"
_EMULATOR = f"{{{NS}}}emulator"
_BEFORE_METADATA = ("name", "uuid", "genid", "title", "description")


class ProtectError(SafeUSBError):
    """A domain that cannot be protected or unprotected as asked."""


def _emulator(root: etree._Element, source: str) -> etree._Element:
    if root.tag != "domain":
        raise ProtectError(f"{source}: not a <domain>")
    el = root.find("devices/emulator")
    if el is None or not (el.text or "").strip():
        raise ProtectError(f"{source}: the domain has no <devices><emulator>")
    return el


def real_emulator(root: etree._Element, source: str = "domain") -> str | None:
    """The real emulator a protected domain keeps in its metadata, or None."""
    gate = root.find(f"metadata/{_GATE}")
    if gate is None:
        return None
    el = gate.find(_EMULATOR)
    if el is None or not (el.text or "").strip():
        raise ProtectError(f"{source}: safeusb metadata without an emulator")
    return (el.text or "").strip()


def protect_xml(root: etree._Element, source: str = "domain",
                gate_root: str = GATE_ROOT) -> etree._Element:
    """A copy of the domain whose emulator is the gate; refuses a protected domain."""
    emulator = _emulator(root, source)
    current = (emulator.text or "").strip()
    if real_emulator(root, source) is not None or is_gate_path(current, gate_root):
        raise ProtectError(f"{source}: already protected (emulator {current})")
    new = copy.deepcopy(root)
    _emulator(new, source).text = launcher_path(current, gate_root)
    metadata = new.find("metadata")
    if metadata is None:
        metadata = etree.Element("metadata")
        metadata.tail = root.text
        after = [c for c in new if c.tag in _BEFORE_METADATA]
        new.insert(new.index(after[-1]) + 1 if after else 0, metadata)
    gate = etree.SubElement(metadata, _GATE, nsmap={"safeusb": NS})
    etree.SubElement(gate, _EMULATOR).text = current
    return new


def unprotect_xml(root: etree._Element, source: str = "domain",
                  gate_root: str = GATE_ROOT) -> etree._Element:
    """A copy of the domain with its real emulator back and safeusb's metadata gone."""
    current = (_emulator(root, source).text or "").strip()
    real = real_emulator(root, source)
    if real is None:
        raise ProtectError(f"{source}: not protected (emulator {current})")
    expected = launcher_path(real, gate_root)
    if current != expected:
        raise ProtectError(f"{source}: emulator is {current}, not the gate {expected} that "
                           "protect set; fix <emulator> by hand")
    new = copy.deepcopy(root)
    _emulator(new, source).text = real
    metadata = new.find("metadata")
    assert metadata is not None
    for el in metadata.findall(_GATE):
        metadata.remove(el)
    if len(metadata) == 0:
        new.remove(metadata)
    return new


def to_text(root: etree._Element) -> str:
    return etree.tostring(root, encoding="unicode")


# The system layer: the launcher symlink and libvirt


def gate_program() -> str:
    """The gate's program in this environment, refused unless only root can change it
    and the code it runs (QEMU's user runs it, root in some configurations)."""
    path = os.path.join(os.path.dirname(sys.executable), PROG)
    if not os.access(path, os.X_OK):
        raise ProtectError(f"{path} is not installed (install safeusb into this environment)")
    try:
        trust.check_path(path)
        trust.check_path(os.path.dirname(os.path.abspath(__file__)), recursive=True)
    except trust.Untrusted as exc:
        raise ProtectError(f"not putting in a gate others can change: {exc}") from None
    return path


def ensure_launcher(real: str, gate_root: str = GATE_ROOT, program: str | None = None) -> str:
    """GATE_ROOT + real as a symlink to the gate; returns its path."""
    if not os.access(real, os.X_OK):
        raise ProtectError(f"the emulator {real} is not an executable")
    target = program or gate_program()
    link = launcher_path(real, gate_root)
    if os.path.islink(link) and os.readlink(link) == target:
        return link
    files.symlink(link, target)
    return link


def _domain_xml(dom: Domain) -> etree._Element:
    name = dom.name
    return parse_xml(dom.xml(inactive=True, secure=True), name)


def is_protected(root: etree._Element, source: str = "domain",
                 gate_root: str = GATE_ROOT) -> bool:
    """The definition runs the gate: safeusb's metadata, or an emulator under the gate."""
    el = root.find("devices/emulator")
    current = (el.text or "").strip() if el is not None else ""
    try:
        return real_emulator(root, source) is not None or is_gate_path(current, gate_root)
    except ProtectError:
        return True  # safeusb's metadata, damaged: not ours to change again


def confinement_check(conn: Connection) -> list[str]:
    """What the admin must still do for the gate under libvirt's confinement (notes), or
    ProtectError when the gate cannot run under it yet."""
    refusal, notes = confinement.advice(
        confinement.libvirt_security_models(conn.capabilities()))
    if refusal:
        raise ProtectError(refusal)
    return list(notes)


def change_on(conn: Connection, dom: Domain, protect: bool,
              notes: list[str] | None = None) -> str:
    """Protect (or unprotect) one domain on an open connection; ProtectError when it
    cannot be done as asked, libvirt's error as it comes. ``notes``: the confinement
    check's, when the caller made it already."""
    name = dom.name
    if not dom.persistent():
        raise ProtectError(f"{name}: a transient domain has no definition to change")
    root = _domain_xml(dom)
    if protect:
        if notes is None:
            try:
                notes = confinement_check(conn)
            except ProtectError as exc:
                raise ProtectError(f"{name}: {exc}") from None
        new = protect_xml(root, name)
        current = (_emulator(root, name).text or "").strip()
        ensure_launcher(current)
    else:
        new = unprotect_xml(root, name)
    conn.define(to_text(new))
    emulator = (_emulator(new, name).text or "").strip()
    later = " (the running QEMU keeps its emulator until the domain restarts)" \
        if dom.active() else ""
    return "\n".join([f"{name}: emulator {emulator}{later}", *(notes or ())])


def change_domain(name: str, uri: str | None, protect: bool) -> str:
    try:
        with Connection.open(uri) as conn:
            return change_on(conn, conn.domain(name), protect)
    except VirtError as exc:
        raise LibvirtError(f"{name}: {exc}") from None


def protect_all(uri: str | None) -> tuple[list[str], bool]:
    """Protect every defined domain: a line for each (protected now, already protected,
    or why not), and whether every one is protected now."""
    lines: list[str] = []
    ok = True
    try:
        conn = Connection.open(uri)
    except VirtError as exc:
        raise LibvirtError(f"libvirt: {exc}") from None
    with conn:
        try:
            domains = conn.domains(persistent_only=True)
        except VirtError as exc:
            raise LibvirtError(f"libvirt: {exc}") from None
        try:
            notes = confinement_check(conn)
        except ProtectError as exc:
            refusal: str | None = str(exc)
            notes = []
        else:
            refusal = None
        for dom in domains:
            name = ""
            try:
                name = dom.name
                if is_protected(_domain_xml(dom), name):
                    emulator = (_emulator(_domain_xml(dom), name).text or "").strip()
                    lines.append(f"{name}: already protected (emulator {emulator})")
                    continue
                if refusal is not None:
                    raise ProtectError(f"{name}: {refusal}")
                lines.append(change_on(conn, dom, True, notes=[]))
            except SafeUSBError as exc:
                ok = False
                text = str(exc)
                lines.append(f"{name}: NOT protected: "
                             f"{text[len(name) + 2:] if text.startswith(name + ': ') else text}")
        if not domains:
            lines.append("no domains are defined")
        lines.extend(notes)
    return lines, ok


def run(args: argparse.Namespace) -> int:
    if getattr(args, "all", False):
        if args.command != "protect" or args.domain is not None:
            raise UsageError("--all goes with protect and no DOMAIN")
        lines, ok = protect_all(args.connect)
        print("\n".join(lines))
        return 0 if ok else EXIT_IN_USE
    if args.domain is None:
        raise UsageError(f"{args.command}: give a DOMAIN" + (" or --all" if args.command ==
                                                              "protect" else ""))
    print(change_domain(args.domain, args.connect, args.command == "protect"))
    return 0
