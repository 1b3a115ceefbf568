"""The text of inspect's findings, one line per reason. Light: `safeusb inspect` prints
safeusbd's answer with it without importing the model or the scan."""

from __future__ import annotations

from typing import Any


def human_bytes(n: int) -> str:
    """A byte count for people: "512 B", "4.0 MiB", "1.5 TiB" (and "2048.0 TiB" above)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


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
    return findings_text(head, reasons, warnings, notes)


def findings_text(head: str, reasons: list[str], warnings: list[str], notes: list[str]) -> str:
    tail = ["  warning: " + w for w in warnings] + ["  note: " + n for n in notes]
    if not reasons:
        return "\n".join([f"{head}: nothing on the host uses it; it can be handed over now",
                          *tail]) + "\n"
    count = f"{len(reasons)} reason" + ("s" if len(reasons) != 1 else "")
    lines = [f"{head}: in use, not safe to hand over ({count})"]
    lines.extend("  " + r for r in reasons)
    lines.extend(tail)
    return "\n".join(lines) + "\n"
