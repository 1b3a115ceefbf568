"""Render findings for people (one line per reason) and for programs (JSON)."""

from __future__ import annotations

from typing import Any

from safeusb.host.model import DevNum, fmt_devnum
from safeusb.host.usb_classes import class_json
from safeusb.inspect.decide import Findings
from safeusb.textout import findings_text, text_of_json

__all__ = ["SCHEMA_VERSION", "as_json", "as_text", "text_of_json"]

SCHEMA_VERSION = 1


def as_text(f: Findings) -> str:
    return findings_text(f.snapshot.target.describe(), [r.text for r in f.reasons],
                 [w.text for w in f.warnings], list(f.notes))


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
