"""Kernel text formats and selectors: examples and properties."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safeusb.errors import SelectorError
from safeusb.host.parsers import (
    ParseError,
    parse_bdi_stats,
    parse_maps_dev_nodes,
    parse_maps_devices,
    parse_mountinfo,
    parse_ns_link,
    parse_swaps,
    unescape,
)
from safeusb.host.selector import Selector

MOUNTINFO = (
    "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
    "40 36 8:1 / /media/my\\040stick rw shared:5 master:2 - vfat /dev/sda1 rw,fmask=0022\n"
    "41 36 0:45 / /data rw - btrfs /dev/sdb rw,space_cache\n"
)


def test_mountinfo_example() -> None:
    a, b, c = parse_mountinfo(MOUNTINFO)
    assert (a.devnum, a.root, a.mountpoint, a.fstype, a.source) == (
        (98, 0), "/mnt1", "/mnt/parent", "ext3", "/dev/root")
    assert b.mountpoint == "/media/my stick" and b.devnum == (8, 1) and b.fstype == "vfat"
    assert c.devnum == (0, 45) and c.super_options == "rw,space_cache"


@pytest.mark.parametrize("bad", ["1 2 3\n", "x 1 8:1 / / rw - ext4 /dev/a rw\n",
                                 "1 1 8:x / / rw - ext4 /dev/a rw\n",
                                 "1 1 8:1 / / rw shared:1 ext4 /dev/a rw\n"])
@pytest.mark.hostile
def test_mountinfo_rejects_garbage(bad: str) -> None:
    with pytest.raises(ParseError):
        parse_mountinfo(bad)


_path = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=20)


def _escape(s: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in s)


@given(st.lists(st.tuples(_path, st.text(" \tab\\/", min_size=1, max_size=8)), max_size=5),
       st.integers(0, 4095), st.integers(0, 2**20))
def test_mountinfo_roundtrip(parts: list[tuple[str, str]], major: int, minor: int) -> None:
    lines = []
    expected = []
    for i, (src, mp) in enumerate(parts):
        mountpoint = "/" + mp
        lines.append(f"{i + 10} 1 {major}:{minor} / {_escape(mountpoint)} rw shared:{i} - ext4 "
                     f"{_escape(src)} rw\n")
        expected.append((mountpoint, src))
    got = parse_mountinfo("".join(lines))
    assert [(m.mountpoint, m.source) for m in got] == expected
    assert all(m.devnum == (major, minor) for m in got)


@given(st.text(max_size=300))
@pytest.mark.hostile
def test_parsers_never_raise_anything_but_parse_error(text: str) -> None:
    for parser in (parse_mountinfo, parse_swaps, parse_bdi_stats, parse_ns_link):
        try:
            parser(text)  # type: ignore[operator]
        except ParseError:
            pass
    parse_maps_devices(text)
    unescape(text)


def test_swaps() -> None:
    text = ("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
            "/dev/sda2                               partition\t1048572\t\t0\t\t-2\n"
            "/mnt/stick/swap\\040file                 file\t\t65532\t\t12\t\t-3\n")
    assert parse_swaps(text) == (("/dev/sda2", "partition", 1048572, 0),
                                 ("/mnt/stick/swap file", "file", 65532, 12))
    with pytest.raises(ParseError):
        parse_swaps("garbage\n")


def test_bdi_stats() -> None:
    text = ("BdiWriteback:              12 kB\nBdiReclaimable:          4096 kB\n"
            "BdiDirtyThresh:        602336 kB\nBdiWriteBandwidth:           0 kBps\n")
    assert parse_bdi_stats(text) == (4096 * 1024, 12 * 1024)
    with pytest.raises(ParseError):
        parse_bdi_stats("BdiWriteback: 1 kB\n")


def test_maps_devices() -> None:
    text = ("55d0-55d1 r--p 00000000 08:01 1234    /mnt/stick/lib.so\n"
            "7ff0-7ff1 rw-p 00000000 00:00 0 \n"
            "7ff2-7ff3 r-xp 00000000 fd:00 99      /usr/lib/x.so\n")
    assert parse_maps_devices(text) == {(8, 1): "/mnt/stick/lib.so", (253, 0): "/usr/lib/x.so"}


def test_maps_dev_nodes() -> None:
    text = ("55d0-55d1 r--p 00000000 08:01 1234    /mnt/stick/lib.so\n"
            "7f75e85dc000-7f75e85dd000 rw-s 00000000 00:06 100        /dev/loop6\n"
            "7ff0-7ff1 rw-s 00000000 00:01 7       /dev/zero (deleted)\n"
            "7ff2-7ff3 rw-p 00000000 00:00 0 \n"
            "zz-7ff5 rw-s 00000000 00:06 101       /dev/sda\n")
    assert parse_maps_dev_nodes(text) == [
        ("7f75e85dc000-7f75e85dd000", 0x7F75E85DC000, "/dev/loop6", os.makedev(0, 6), 100),
        ("7ff0-7ff1", 0x7FF0, "/dev/zero (deleted)", os.makedev(0, 1), 7)]


@pytest.mark.parametrize(("text", "fields"), [
    ("2-1", {"sysname": "2-1"}),
    ("1-1.4.2", {"sysname": "1-1.4.2"}),
    ("002:003", {"bus": 2, "device": 3}),
    ("2:3", {"bus": 2, "device": 3}),
    ("46f4:0001", {"vendor_id": 0x46F4, "product_id": 1}),
    ("/dev/sda1", {"path": "/dev/sda1"}),
    ("/dev/bus/usb/002/003", {"path": "/dev/bus/usb/002/003"}),
])
def test_selector_forms(text: str, fields: dict[str, object]) -> None:
    sel = Selector.from_string(text)
    for key, value in fields.items():
        assert getattr(sel, key) == value


@given(st.text(max_size=40))
@pytest.mark.hostile
def test_selector_parser_total(text: str) -> None:
    try:
        Selector.from_string(text)
    except SelectorError as exc:
        assert exc.selector == text
