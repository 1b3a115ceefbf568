"""`device_add` read the way QEMU 7.2 reads it.

The gate decides on a usb-host device only if it reads the request exactly as QEMU will;
every rule here reproduces QEMU's behaviour (recorded against a real QEMU by
tests/host/test_gate_parity.py), and whatever QEMU could read in a way this module does
not model is refused (QemuSyntaxError) rather than guessed:

- HMP (monitor/hmp.c): the command name runs to the first C white-space character or '/';
  device_add's one argument (type 'O') is a word or a double-quoted string with the
  escapes \\n \\r \\\\ \\' \\" (any other escape, or no closing quote, fails the command);
  anything but white space after it fails the command ("extraneous characters"). The
  argument is read into a 1024-byte buffer: one longer than 1023 bytes would be cut
  short, so it is refused.
- QemuOpts (util/qemu-option.c, qemu_opts_parse with the implied name "driver"): items
  split at single commas, ",," is a literal comma in a value (not in a name); the first
  item without '=' is the driver; a later item without '=' is a flag, "foo" is foo=on and
  "nofoo" is foo=off, "help" or "?" asks for help and adds nothing. A key given twice
  keeps its last value (qemu_opts_to_qdict).
- QMP device_add (softmmu/qdev-monitor.c, qemu_opts_from_qdict): every argument becomes
  a QemuOpts string: a JSON string as is, a boolean as on/off, an integer in decimal, a
  float as C's "%.17g"; null, arrays and objects are dropped.
- Numbers (qapi/qobject-input-visitor.c keyval, util/cutils.c qemu_strtou64): C strtoull
  in base 0 over the whole string: leading C white space, an optional sign (a minus
  negates modulo 2**64), 0x/0X hexadecimal, a leading 0 octal, nothing after the digits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from safeusb.errors import SafeUSBError

C_SPACE = frozenset(" \t\n\v\f\r")  # isspace() in the C locale
HMP_ARG_MAX = 1023  # monitor_parse_arguments' buffer, less its terminator
UINT64_MAX = 2**64 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_DIGITS = {8: frozenset("01234567"), 10: frozenset("0123456789"),
           16: frozenset("0123456789abcdefABCDEF")}
_HMP_ESCAPES = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


class QemuSyntaxError(SafeUSBError):
    """QEMU would refuse the text, or the gate cannot be sure how QEMU reads it."""


def _strtox(text: str, base: int) -> tuple[bool, int] | None:
    """C strtoull/strtol over the whole text: (negative, magnitude), or None where
    QEMU's qemu_strto* report an error because no digits or other characters follow."""
    i, n = 0, len(text)
    while i < n and text[i] in C_SPACE:
        i += 1
    negative = False
    if i < n and text[i] in "+-":
        negative = text[i] == "-"
        i += 1
    if base == 0:
        if text[i:i + 2] in ("0x", "0X") and i + 2 < n and text[i + 2] in _DIGITS[16]:
            base, i = 16, i + 2
        elif text[i:i + 1] == "0":
            base = 8
        else:
            base = 10
    j = i
    while j < n and text[j] in _DIGITS[base]:
        j += 1
    if j == i or j != n:
        return None
    return negative, int(text[i:j], base)


def qemu_strtou64(text: str) -> int | None:
    """QEMU's qemu_strtou64(text, NULL, 0, &value): the value, or None for an error."""
    parsed = _strtox(text, 0)
    if parsed is None:
        return None
    negative, magnitude = parsed
    if magnitude > UINT64_MAX:
        return None  # ERANGE
    return (-magnitude) % 2**64 if negative else magnitude


def qemu_strtol10(text: str) -> int | None:
    """QEMU's qemu_strtol(text, NULL, 10, &value) on a 64-bit host (qemu_parse_fd)."""
    parsed = _strtox(text, 10)
    if parsed is None:
        return None
    negative, magnitude = parsed
    value = -magnitude if negative else magnitude
    if not INT64_MIN <= value <= INT64_MAX:
        return None  # ERANGE
    return value


# HMP


def hmp_command(line: str) -> tuple[str, str] | None:
    """The HMP command name and the text after it (white space skipped), or None for an
    empty line (QEMU runs nothing)."""
    i, n = 0, len(line)
    while i < n and line[i] in C_SPACE:
        i += 1
    if i == n:
        return None
    start = i
    while i < n and line[i] != "/" and line[i] not in C_SPACE:
        i += 1
    name = line[start:i]
    while i < n and line[i] in C_SPACE:
        i += 1
    return name, line[i:]


def hmp_get_str(text: str) -> tuple[str, str]:
    """monitor/hmp.c get_str on text that starts with no white space: (word, rest)."""
    if text.startswith('"'):
        out: list[str] = []
        i, n = 1, len(text)
        while i < n and text[i] != '"':
            c = text[i]
            if c == "\\":
                esc = text[i + 1:i + 2]
                if esc not in _HMP_ESCAPES:
                    raise QemuSyntaxError(f"device_add: unsupported escape \\{esc} in quotes")
                out.append(_HMP_ESCAPES[esc])
                i += 2
            else:
                out.append(c)
                i += 1
        if i >= n:
            raise QemuSyntaxError("device_add: unterminated quoted argument")
        return "".join(out), text[i + 1:]
    i = 0
    while i < len(text) and text[i] not in C_SPACE:
        i += 1
    return text[:i], text[i:]


def hmp_device_add_text(line: str) -> str | None:
    """The QemuOpts text of an HMP `device_add`; None if the line runs another command.
    "" when device_add has no argument. QemuSyntaxError when QEMU would refuse the line
    or cut the argument short."""
    cmd = hmp_command(line)
    if cmd is None or cmd[0] != "device_add":
        return None
    rest = cmd[1]
    if not rest:
        return ""
    arg, after = hmp_get_str(rest)
    if len(arg.encode("utf-8", "surrogatepass")) > HMP_ARG_MAX:
        raise QemuSyntaxError(f"device_add: argument longer than QEMU reads "
                              f"({HMP_ARG_MAX} bytes)")
    if any(c not in C_SPACE for c in after):
        raise QemuSyntaxError("device_add: extraneous characters at the end of line")
    return arg


# QemuOpts


def _opt_value(text: str, i: int) -> tuple[str, int]:
    """get_opt_value: a value up to the next single comma; ',,' is one comma."""
    out: list[str] = []
    while True:
        comma = text.find(",", i)
        if comma < 0:
            out.append(text[i:])
            return "".join(out), len(text)
        if text.startswith(",,", comma):
            out.append(text[i:comma + 1])
            i = comma + 2
            continue
        out.append(text[i:comma])
        return "".join(out), comma


def qemu_opts_items(text: str, implied: str | None = "driver",
                    ) -> tuple[list[tuple[str, str]], bool]:
    """qemu_opts_parse's items, in order, as (name, value), and whether a "help" or "?"
    flag stopped the parse (QEMU then prints help and adds nothing)."""
    items: list[tuple[str, str]] = []
    i, n = 0, len(text)
    first = implied
    while i < n:
        stop = i
        while stop < n and text[stop] not in "=,":
            stop += 1
        if stop < n and text[stop] == "=":
            name = text[i:stop]
            value, i = _opt_value(text, stop + 1)
        elif first is not None:
            name = first
            value, i = _opt_value(text, i)
        else:
            name, i = text[i:stop], stop
            if name.startswith("no"):
                name, value = name[2:], "off"
            elif name in ("help", "?"):
                return items, True
            else:
                value = "on"
        if i < n:  # at a single comma
            i += 1
        first = None
        items.append((name, value))
    return items, False


def opts_dict(items: Iterable[tuple[str, str]]) -> tuple[dict[str, str], set[str]]:
    """qemu_opts_to_qdict: the last value of each name wins. Also the names given twice."""
    out: dict[str, str] = {}
    twice: set[str] = set()
    for name, value in items:
        if name in out:
            twice.add(name)
        out[name] = value
    return out, twice


# QMP


def qmp_opt_string(value: Any) -> str | None:
    """The QemuOpts string qemu_opts_from_qdict makes of a JSON value; None if dropped.
    QemuSyntaxError for an integer beyond 64 bits."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        if not INT64_MIN <= value <= UINT64_MAX:
            raise QemuSyntaxError(f"{value} is beyond 64 bits (QEMU reads it as a float)")
        return str(value)
    if isinstance(value, float):
        return format(value, ".17g")
    return None


def qmp_opts(args: Mapping[str, Any]) -> dict[str, str]:
    """A QMP device_add's arguments as the QemuOpts strings QEMU makes of them."""
    out: dict[str, str] = {}
    for key, value in args.items():
        text = qmp_opt_string(value)
        if text is not None:
            out[key] = text
    return out


