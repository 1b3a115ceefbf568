"""Render findings for people (one line per reason) and for programs (JSON)."""

from __future__ import annotations

from typing import Any

from .classes import class_json
from .inspect import Findings
from .model import DevNum, fmt_devnum

SCHEMA_VERSION = 1


def as_text(f: Findings) -> str:
    return _text(f.snapshot.target.describe(), [r.text for r in f.reasons],
                 [w.text for w in f.warnings], list(f.notes))


def text_of_json(doc: dict[str, Any]) -> str:
    """The text of findings from their JSON form (as_json, or safeusbd's inspect answer):
    the very lines as_text gives for them. ValueError when the object lacks them."""
    try:
        head, free, notes = doc["target"], doc["free"], doc["notes"]
        reasons = [r["text"] for r in doc["reasons"]]
        warnings = [w["text"] for w in doc["warnings"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not an inspect object: {exc}") from None
    texts = [head, *reasons, *warnings, *notes]
    if not isinstance(free, bool) or free != (not reasons) \
            or not all(isinstance(t, str) for t in texts):
        raise ValueError("not an inspect object: wrong types")
    return _text(head, reasons, warnings, notes)


def _text(head: str, reasons: list[str], warnings: list[str], notes: list[str]) -> str:
    tail = ["  warning: " + w for w in warnings] + ["  note: " + n for n in notes]
    if not reasons:
        return "\n".join([f"{head}: nothing on the host uses it; it can be handed over now",
                          *tail]) + "\n"
    count = f"{len(reasons)} reason" + ("s" if len(reasons) != 1 else "")
    lines = [f"{head}: in use, not safe to hand over ({count})"]
    lines.extend("  " + r for r in reasons)
    lines.extend(tail)
    return "\n".join(lines) + "\n"


def as_json(f: Findings) -> dict[str, Any]:
    snap = f.snapshot
    usb = snap.target.usb
    dirty: dict[DevNum, tuple[int | None, int | None]] = {
        d.bdi: (d.dirty_bytes, d.writeback_bytes) for d in snap.dirty
    }
    blocks = []
    for b in snap.blocks.values():
        own = dirty.get(b.devnum) if b.devtype == "disk" else None
        blocks.append(
            {
                "name": b.name,
                "path": b.path,
                "devnum": fmt_devnum(b.devnum),
                "kind": b.kind,
                "size_bytes": b.size_bytes,
                "parent": b.parent,
                "holders": list(b.holders),
                "dm_name": b.dm_name,
                "bdi": fmt_devnum(b.bdi) if b.bdi else None,
                "dirty_bytes": own[0] if own else None,
                "writeback_bytes": own[1] if own else None,
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "target": snap.target.describe(),
        "device": None
        if usb is None
        else {
            "sysname": usb.sysname,
            "busnum": usb.busnum,
            "devnum": usb.devnum,
            "vendor_id": f"{usb.vendor_id:04x}",
            "product_id": f"{usb.product_id:04x}",
            "serial": usb.serial,
            "manufacturer": usb.manufacturer,
            "product": usb.product,
            "interfaces": [
                {"name": i.name, "class": i.interface_class, "driver": i.driver}
                for i in usb.interfaces
            ],
        },
        "free": f.free,
        "block_devices": blocks,
        "nodes": [
            {"path": n.path, "kind": n.kind, "devnum": fmt_devnum(n.devnum),
             "subsystem": n.subsystem}
            for n in snap.nodes
        ],
        "dirty": [
            {"bdi": fmt_devnum(d.bdi), "dirty_bytes": d.dirty_bytes,
             "writeback_bytes": d.writeback_bytes, "error": d.error}
            for d in snap.dirty
        ],
        "mount_namespaces": len(snap.namespaces),
        "reasons": [r.as_json() for r in f.reasons],
        "notes": list(f.notes),
        **class_json(snap.classes),
        "warnings": [w.as_json() for w in f.warnings],
    }
