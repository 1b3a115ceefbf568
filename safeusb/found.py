"""What the per-class decisions hand back to inspect: a kind, a line of text, details."""

from __future__ import annotations

from typing import Any, NamedTuple


class Found(NamedTuple):
    kind: str
    text: str
    details: dict[str, Any]


def size_text(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
