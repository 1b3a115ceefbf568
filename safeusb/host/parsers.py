"""Pure parsers for the kernel's text formats: mountinfo, swaps, bdi stats."""

from __future__ import annotations

import os
import re

from safeusb.host.model import DevNum, MountEntry

_OCTAL = re.compile(r"\\([0-7]{3})")


class ParseError(ValueError):
    """A kernel file that does not have the expected format."""


def unescape(field: str) -> str:
    """Undo the kernel's octal escaping of spaces, tabs, newlines and backslashes."""
    if "\\" not in field:
        return field  # nearly every field: no escape to undo
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_devnum(text: str) -> DevNum:
    major, sep, minor = text.partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        raise ParseError(f"not a device number: {text!r}")
    return int(major), int(minor)


def parse_mountinfo(text: str) -> tuple[MountEntry, ...]:
    """Parse /proc/PID/mountinfo (see proc(5))."""
    entries = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            raise ParseError(f"mountinfo line {lineno}: no '-' separator") from None
        if len(fields) < sep + 4 or sep < 6:
            raise ParseError(f"mountinfo line {lineno}: too few fields")
        try:
            mount_id, parent_id = int(fields[0]), int(fields[1])
        except ValueError:
            raise ParseError(f"mountinfo line {lineno}: bad mount id") from None
        entries.append(
            MountEntry(
                mount_id=mount_id,
                parent_id=parent_id,
                devnum=parse_devnum(fields[2]),
                root=unescape(fields[3]),
                mountpoint=unescape(fields[4]),
                options=fields[5],
                fstype=unescape(fields[sep + 1]),
                source=unescape(fields[sep + 2]),
                super_options=fields[sep + 3],
            )
        )
    return tuple(entries)


def parse_swaps(text: str) -> tuple[tuple[str, str, int, int], ...]:
    """Parse /proc/swaps into (filename, type, size KiB, used KiB)."""
    lines = text.split("\n")
    if not lines or not lines[0].startswith("Filename"):
        raise ParseError("/proc/swaps: missing header")
    out = []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip(" \t"):
            continue
        # The name may contain escaped blanks only; fields are whitespace separated.
        parts = _BLANKS.split(line.strip(" \t"))
        if len(parts) < 5:
            raise ParseError(f"/proc/swaps line {lineno}: too few fields")
        name, kind, size, used = parts[0], parts[1], parts[2], parts[3]
        if not size.isdigit() or not used.isdigit():
            raise ParseError(f"/proc/swaps line {lineno}: bad size")
        filename = unescape(name)
        if filename.endswith("(deleted)") and len(parts) > 5:
            filename = filename[: -len("(deleted)")]
        out.append((filename, kind, int(size), int(used)))
    return tuple(out)


_BLANKS = re.compile(r"[ \t]+")
_BDI_LINE = re.compile(r"^(\w+):\s+(\d+)\s*(kB|kBps)?\s*$")


def parse_bdi_stats(text: str) -> tuple[int, int]:
    """Dirty and under-writeback bytes from /sys/kernel/debug/bdi/MAJ:MIN/stats."""
    values: dict[str, int] = {}
    for line in text.split("\n"):
        m = _BDI_LINE.match(line.strip())
        if m and m.group(3) == "kB":
            values[m.group(1)] = int(m.group(2)) * 1024
    try:
        return values["BdiReclaimable"], values["BdiWriteback"]
    except KeyError as exc:
        raise ParseError(f"bdi stats: no {exc.args[0]} line") from None


def parse_ns_link(target: str, kind: str = "mnt") -> int:
    """The inode of a namespace link target such as 'mnt:[4026531841]'."""
    prefix = kind + ":["
    if not target.startswith(prefix) or not target.endswith("]"):
        raise ParseError(f"not a {kind} namespace link: {target!r}")
    inode = target[len(prefix) : -1]
    if not inode.isdigit():
        raise ParseError(f"not a {kind} namespace link: {target!r}")
    return int(inode)


def parse_maps_files(text: str) -> list[tuple[str, int, str, int, int]]:
    """The file-backed mappings in /proc/PID/maps, in address order: (the range as
    /proc/PID/map_files names it, its start, the path, the file's st_dev and inode)."""
    found = []
    for line in text.split("\n"):
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        span = parts[0]
        major, _, minor = parts[3].partition(":")
        try:
            start = int(span.partition("-")[0], 16)
            dev = os.makedev(int(major, 16), int(minor, 16))
            ino = int(parts[4])
        except ValueError:
            continue
        found.append((span, start, parts[5], dev, ino))
    return found


def parse_maps_dev_nodes(text: str) -> list[tuple[str, int, str, int, int]]:
    """parse_maps_files's mappings of files under /dev/ (where device nodes are)."""
    return [m for m in parse_maps_files(text) if m[2].startswith("/dev/")]


def parse_maps_devices(text: str) -> dict[DevNum, str]:
    """Device numbers (and one path each) of file-backed mappings in /proc/PID/maps."""
    found: dict[DevNum, str] = {}
    for line in text.split("\n"):
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        dev = parts[3]
        if dev == "00:00":
            continue
        major, _, minor = dev.partition(":")
        try:
            num = (int(major, 16), int(minor, 16))
        except ValueError:
            continue
        found.setdefault(num, parts[5])
    return found
