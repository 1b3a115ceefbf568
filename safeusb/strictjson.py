"""JSON read strictly, as RFC 8259 has it and nothing Python adds: UTF-8 only, no NaN or
Infinity, no duplicate keys; bounded nesting. Used wherever safeusb reads JSON that a
program behind it (QEMU) or a caller of its service wrote."""

from __future__ import annotations

import json
import math
from typing import Any


class StrictJSONError(ValueError):
    """Not strict JSON; the message says why."""


def _no_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"{text} is out of range")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise StrictJSONError(f"duplicate key {key!r}")
        doc[key] = value
    return doc


def loads(data: bytes, finite: bool = False) -> Any:
    """The value; with finite, a number too large for a float is refused too."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"not UTF-8 ({exc.reason})") from None
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique,
                          parse_float=_finite if finite else float)
    except RecursionError:
        raise StrictJSONError("nested too deeply") from None
    except StrictJSONError:
        raise
    except ValueError as exc:
        raise StrictJSONError(str(exc)) from None
