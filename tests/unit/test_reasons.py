"""Typed reasons: the JSON of each kind (what `safeusb inspect --json` and safeusbd send),
field for field and in order, and reading it back."""

from __future__ import annotations

import json

import pytest

from safeusb.reasons import (
    VARIANTS,
    CannotRead,
    Dirty,
    Exclusive,
    Holder,
    LastInput,
    LoopHolder,
    ModeSwitchMaybe,
    ModeSwitchStorage,
    ModeSwitchSwitched,
    Mount,
    NetworkAddress,
    NetworkEnslaved,
    NetworkRoute,
    NetworkStacked,
    NetworkUp,
    Open,
    Reason,
    ReasonKind,
    Submount,
    Swap,
    Use,
    reason_from_json,
)
from safeusb.textout import human_bytes

NET = ("usb0", 4026531840, "pid 1 (init)")
SWITCH = ("12d1", "1001")

# Each reason, and its JSON exactly as inspect wrote it before the details were typed.
PINNED = [
    (Mount("sda1", "/media/stick", "ext4", "rw,relatime", 4026531841, 1, "systemd"),
     '{"kind": "mount", "text": "t", "device": "sda1", "mountpoint": "/media/stick", '
     '"fstype": "ext4", "options": "rw,relatime", "mnt_ns": 4026531841, "pid": 1, '
     '"comm": "systemd"}'),
    (Submount("/media/stick/cache", "tmpfs", "tmpfs", "/media/stick", 0, 50),
     '{"kind": "submount", "text": "t", "mountpoint": "/media/stick/cache", '
     '"fstype": "tmpfs", "source": "tmpfs", "below": "/media/stick", "mnt_ns": 0, '
     '"pid": 50}'),
    (Swap("/dev/sda2", 4096),
     '{"kind": "swap", "text": "t", "filename": "/dev/sda2", "used_bytes": 4096}'),
    (Holder("sda1", "dm-0", "dm-crypt", "luks-1"),
     '{"kind": "holder", "text": "t", "device": "sda1", "holder": "dm-0", '
     '"holder_kind": "dm-crypt", "dm_name": "luks-1"}'),
    (LoopHolder("loop0", "/media/stick/disk.img"),
     '{"kind": "holder", "text": "t", "device": null, "holder": "loop0", '
     '"holder_kind": "loop", "backing_file": "/media/stick/disk.img"}'),
    (Open(42, "tar", "/dev/sda1", (Use("cwd", "/media/stick"), Use("fd", "/media/stick/a"))),
     '{"kind": "open", "text": "t", "pid": 42, "comm": "tar", "device": "/dev/sda1", '
     '"uses": [{"how": "cwd", "path": "/media/stick"}, {"how": "fd", "path": '
     '"/media/stick/a"}]}'),
    (Open(7, "cat", "/dev/ttyUSB0", ()),
     '{"kind": "open", "text": "t", "pid": 7, "comm": "cat", "device": "/dev/ttyUSB0", '
     '"uses": []}'),
    (Exclusive("sda"), '{"kind": "exclusive", "text": "t", "device": "sda"}'),
    (Dirty("sda", 4194304, 0),
     '{"kind": "dirty", "text": "t", "device": "sda", "dirty_bytes": 4194304, '
     '"writeback_bytes": 0}'),
    (NetworkRoute(*NET, "default", "10.0.0.1", 254),
     '{"kind": "network", "text": "t", "interface": "usb0", "netns": 4026531840, '
     '"netns_where": "pid 1 (init)", "cause": "default-route", "destination": "default", '
     '"gateway": "10.0.0.1", "table": 254}'),
    (NetworkRoute("usb0", 7, None, "10.1.0.0/16", None, 100),
     '{"kind": "network", "text": "t", "interface": "usb0", "netns": 7, '
     '"netns_where": null, "cause": "route", "destination": "10.1.0.0/16", '
     '"gateway": null, "table": 100}'),
    (NetworkAddress(*NET, "10.0.0.2/24"),
     '{"kind": "network", "text": "t", "interface": "usb0", "netns": 4026531840, '
     '"netns_where": "pid 1 (init)", "cause": "address", "address": "10.0.0.2/24"}'),
    (NetworkEnslaved(*NET, "br0", "bridge"),
     '{"kind": "network", "text": "t", "interface": "usb0", "netns": 4026531840, '
     '"netns_where": "pid 1 (init)", "cause": "enslaved", "master": "br0", '
     '"master_kind": "bridge"}'),
    (NetworkStacked(*NET, "eth0", "vlan"),
     '{"kind": "network", "text": "t", "interface": "usb0", "netns": 4026531840, '
     '"netns_where": "pid 1 (init)", "cause": "stacked", "lower": "eth0", '
     '"link_kind": "vlan"}'),
    (NetworkUp(*NET, "up", 1024, None),
     '{"kind": "network", "text": "t", "interface": "usb0", "netns": 4026531840, '
     '"netns_where": "pid 1 (init)", "cause": "up", "operstate": "up", "rx_bytes": 1024, '
     '"tx_bytes": null}'),
    (LastInput("keyboard", ("input5",), ("kbd",), ("input6",)),
     '{"kind": "last-input", "text": "t", "input": "keyboard", "devices": ["input5"], '
     '"names": ["kbd"], "inhibited": ["input6"]}'),
    (CannotRead("dirty data on sda", None),
     '{"kind": "unreadable", "text": "t", "what": "dirty data on sda", "error": null}'),
    (ModeSwitchStorage(*SWITCH, ("12d1:1406",), ("/usr/share/usb_modeswitch",)),
     '{"kind": "mode-switch", "text": "t", "vendor_id": "12d1", "product_id": "1001", '
     '"mode": "storage", "switches_to": ["12d1:1406"], "database": '
     '["/usr/share/usb_modeswitch"]}'),
    (ModeSwitchSwitched(*SWITCH, ("12d1:1446",), ("/usr/share/usb_modeswitch",)),
     '{"kind": "mode-switch", "text": "t", "vendor_id": "12d1", "product_id": "1001", '
     '"mode": "switched", "storage_ids": ["12d1:1446"], "database": '
     '["/usr/share/usb_modeswitch"]}'),
    (ModeSwitchMaybe(*SWITCH),
     '{"kind": "mode-switch", "text": "t", "vendor_id": "12d1", "product_id": "1001", '
     '"mode": "maybe-storage", "database": []}'),
]


def test_every_variant_is_pinned() -> None:
    assert {type(d) for d, _ in PINNED} == set(VARIANTS)
    assert {d.KIND for d, _ in PINNED} == set(ReasonKind)


@pytest.mark.parametrize(("details", "text"), PINNED, ids=lambda x: type(x).__name__)
def test_json_is_as_before_and_reads_back(details: object, text: str) -> None:
    assert isinstance(details, tuple(VARIANTS))
    reason = Reason("t", details)
    assert json.dumps(reason.as_json()) == text
    assert reason.kind == json.loads(text)["kind"]
    back = reason_from_json(json.loads(text))  # what safeusbd's answer carries
    assert back == reason and json.dumps(back.as_json()) == text


@pytest.mark.parametrize("doc", [
    {"kind": "mount"},  # no text
    {"kind": "mount", "text": "t", "device": "sda1"},  # fields missing
    {"kind": "swap", "text": "t", "filename": "/dev/sda2", "used_bytes": "4096"},  # a string
    {"kind": "swap", "text": "t", "filename": "/dev/sda2", "used_bytes": 1, "more": 1},
    {"kind": "network", "text": "t", "interface": "usb0", "netns": 1, "netns_where": None,
     "cause": "route", "destination": "default", "gateway": None, "table": 254},
    {"kind": "mode-switch", "text": "t", "vendor_id": "12d1", "product_id": "1001",
     "mode": "maybe-storage", "database": ["x"]},
    {"kind": "weather", "text": "t"},
    ["mount"],
])
def test_what_no_reason_gives_is_refused(doc: object) -> None:
    with pytest.raises(ValueError):
        reason_from_json(doc)


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (4 * 2**20, "4.0 MiB"),
    (2**30 - 1, "1024.0 MiB"), (2**30, "1.0 GiB"), (2**40 - 1, "1024.0 GiB"),
    (2**40, "1.0 TiB"), (5 * 2**40 + 2**39, "5.5 TiB"), (2**50, "1024.0 TiB"),
    (2**60, "1048576.0 TiB"),
])
def test_byte_counts_as_both_formatters_printed_them(n: int, text: str) -> None:
    """inspect's human_bytes and netinfo's size_text gave the same text for every count
    (both stop at TiB); the one formatter left gives it still."""
    assert human_bytes(n) == text
