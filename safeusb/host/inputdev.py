"""Keyboards and pointing devices: whether a device provides the host's last one."""

from __future__ import annotations

import os
import struct

from safeusb.host.model import InputDevice, InputScan, Unreadable
from safeusb.host.roots import Roots
from safeusb.reasons import CannotRead, LastInput, Reason

# The kernel prints capability bitmaps as unsigned longs of the reading process's width
# (32-bit words to a 32-bit process), most significant first, unpadded.
WORD_BITS = struct.calcsize("l") * 8  # the kernel's long, as in its bitmaps

EV_KEY, EV_REL, EV_ABS = 0x01, 0x02, 0x03
REL_X, REL_Y = 0x00, 0x01
ABS_X, ABS_Y = 0x00, 0x01
BTN_LEFT, BTN_TOUCH = 0x110, 0x14A
# KEY_Q..KEY_P, KEY_A..KEY_L, KEY_Z..KEY_M
LETTER_KEYS = (*range(16, 26), *range(30, 39), *range(44, 51))


class BitmapError(ValueError):
    pass


def parse_bitmap(text: str, word_bits: int = WORD_BITS) -> int:
    """A capabilities file ("120013", "10000 0 0 0 e080ffdf01cfffff fffffffffffffffe") as
    one integer whose bit N is capability N."""
    value = 0
    try:
        for word in text.split():
            value = (value << word_bits) | int(word, 16)
    except ValueError:
        raise BitmapError(f"not a capability bitmap: {text.strip()[:60]!r}") from None
    return value


def _bit(bits: int, n: int) -> bool:
    return bool(bits >> n & 1)


def is_keyboard(ev: int, key: int) -> bool:
    return _bit(ev, EV_KEY) and all(_bit(key, k) for k in LETTER_KEYS)


def is_pointer(ev: int, key: int, rel: int, abs_: int) -> bool:
    relative = (_bit(ev, EV_REL) and _bit(rel, REL_X) and _bit(rel, REL_Y)
                and _bit(key, BTN_LEFT))
    absolute = (_bit(ev, EV_ABS) and _bit(abs_, ABS_X) and _bit(abs_, ABS_Y)
                and (_bit(key, BTN_LEFT) or _bit(key, BTN_TOUCH)))
    return _bit(ev, EV_KEY) and (relative or absolute)


def _under(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def _class_link(real_base: str, name: str) -> str:
    """Where a class directory's entry (a relative link into /sys/devices, whose
    directories are no links) leads: one readlink, where realpath would lstat each part."""
    path = os.path.join(real_base, name)
    try:
        return os.path.normpath(os.path.join(real_base, os.readlink(path)))
    except OSError:
        return os.path.realpath(path)


def read_inputs(roots: Roots, target_syspath: str) -> InputScan:
    """Every input device with the capabilities of a keyboard or a pointing device; none
    when the target provides no input device (the others then decide nothing)."""
    base = roots.sys_path("class", "input")
    try:
        names = sorted(n for n in os.listdir(base) if n.startswith("input"))
    except FileNotFoundError:
        return InputScan()  # no input subsystem: no keyboards or pointers at all
    except OSError as exc:
        return InputScan(unreadable=(Unreadable(base, exc.strerror or str(exc)),))
    target = os.path.realpath(target_syspath)
    real_base = os.path.realpath(base)
    paths = {sysname: _class_link(real_base, sysname) for sysname in names}
    if not any(_under(path, target) for path in paths.values()):
        return InputScan()
    devices = []
    problems = []
    for sysname in names:
        path = paths[sysname]
        caps = {}
        try:
            for cap in ("ev", "key", "rel", "abs"):
                try:
                    with open(os.path.join(path, "capabilities", cap), encoding="ascii") as f:
                        caps[cap] = parse_bitmap(f.read())
                except FileNotFoundError:
                    caps[cap] = 0
            with open(os.path.join(path, "name"), encoding="utf-8", errors="replace") as f:
                name = f.read().strip()
            try:
                with open(os.path.join(path, "inhibited"), encoding="ascii") as f:
                    inhibited = f.read().strip() != "0"
            except FileNotFoundError:
                inhibited = False  # a kernel before 5.11 cannot inhibit input devices
        except (OSError, BitmapError) as exc:
            if os.path.exists(path):
                problems.append(Unreadable(f"capabilities of input device {sysname}", str(exc)))
            continue
        keyboard = is_keyboard(caps["ev"], caps["key"])
        pointer = is_pointer(caps["ev"], caps["key"], caps["rel"], caps["abs"])
        on_target = _under(path, target)
        if keyboard or pointer or on_target:
            devices.append(InputDevice(sysname, name, keyboard, pointer, on_target, inhibited))
    return InputScan(tuple(devices), tuple(problems))


def input_reasons(scan: InputScan) -> list[Reason]:
    """The device provides the host's last keyboard or last pointing device (kind
    ``last-input``); or it provides one and the others cannot all be read. Inhibited
    devices elsewhere do not count as others: they deliver nothing."""
    out: list[Reason] = []
    for what, attr in (("keyboard", "keyboard"), ("pointing device", "pointer")):
        mine = [d for d in scan.devices if d.on_target and getattr(d, attr)]
        elsewhere = [d for d in scan.devices if not d.on_target and getattr(d, attr)]
        others = [d for d in elsewhere if not d.inhibited]
        if not mine or others:
            continue
        shown = ", ".join(f"{d.sysname} ({d.name})" for d in mine)
        inhibited = [d for d in elsewhere if d.inhibited]
        if inhibited:
            names = ", ".join(f"{d.sysname} ({d.name})" for d in inhibited)
            shown += f"; {names} {'is' if len(inhibited) == 1 else 'are'} inhibited"
        if scan.unreadable:
            out.append(Reason(
                f"it provides a {what} ({shown}) and not every other input device can be "
                f"read to tell whether the host has another",
                CannotRead(f"other {what}s", "; ".join(
                    f"{p.what}: {p.error}" for p in scan.unreadable))))
            continue
        out.append(Reason(
            f"it provides the host's last {what}: {shown}",
            LastInput(attr, tuple(d.sysname for d in mine), tuple(d.name for d in mine),
                      tuple(d.sysname for d in inhibited))))
    return out
