"""The gate reads device_add as QEMU 7.2 does, or refuses: each known way the two readings
parted, and QEMU's number, HMP and QemuOpts rules (recorded from a real QEMU 7.2 by
tests/host/test_gate_parity.py, which also compares generated requests live)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeusb.gate.qemu_usb_host import RequestError, device_add_request
from safeusb.gate.qemuparse import (
    hmp_device_add_text,
    qemu_opts_items,
    qemu_strtol10,
    qemu_strtou64,
    qmp_opt_string,
)
from safeusb.gate.session import Action, Ask, Session, ToClient
from safeusb.host.usbfs import FdIdentity

STICK = FdIdentity("/dev/bus/usb/002/003", (189, 130))
OTHER = FdIdentity("/dev/bus/usb/001/005", (189, 4))


def hmp(line: str) -> dict[str, Any]:
    return {"execute": "human-monitor-command", "arguments": {"command-line": line}}


def qmp(**args: Any) -> dict[str, Any]:
    return {"execute": "device_add", "arguments": {"driver": "usb-host", **args}}


def busaddr(msg: dict[str, Any]) -> tuple[int | None, int | None]:
    req = device_add_request(msg, {})
    assert req is not None
    return req.hostbus, req.hostaddr


# numbers: qemu_strtou64 in base 0, as QEMU 7.2 answered (failed to find host usb device B:A)

@pytest.mark.parametrize(("text", "value"), [
    ("10", 10), ("010", 8), ("0x10", 16), ("0X1f", 31), ("0", 0), ("00", 0), ("+7", 7),
    (" \t\n\v\f\r9", 9), ("-18446744073709551614", 2), ("-0", 0), ("0777", 511),
    ("18446744073709551615", 2**64 - 1),
])
def test_numbers_qemu_reads(text: str, value: int) -> None:
    assert qemu_strtou64(text) == value


@pytest.mark.parametrize("text", [
    "", " ", "08", "0x", "0xg", "1 ", "1_0", "\u0663", "1.0", "on", "- 1", "+-1", "0b1",
    "18446744073709551616", "-18446744073709551616", "1\x00", "\u00a01", "++1",
])
def test_numbers_qemu_refuses(text: str) -> None:
    assert qemu_strtou64(text) is None


def test_fdset_numbers_are_base_10_with_sign_and_space() -> None:
    assert [qemu_strtol10(t) for t in ("1", "01", "+1", " 1", "010", "-0")] == [1, 1, 1, 1, 10, 0]
    assert [qemu_strtol10(t) for t in ("0x1", "1 ", "", "9223372036854775808")] == [None] * 4


@pytest.mark.parametrize(("msg", "expect"), [
    # a leading zero is octal for QEMU: the old gate checked 2:10, QEMU opened 2:8
    (qmp(hostbus=2, hostaddr="010"), (2, 8)),
    (hmp("device_add usb-host,hostbus=2,hostaddr=010"), (2, 8)),
    (qmp(hostbus="0X2", hostaddr="0x1F"), (2, 31)),
    (qmp(hostbus=" 2", hostaddr="+3"), (2, 3)),
    (qmp(hostbus=2, hostaddr="-18446744073709551613"), (2, 3)),
    # JSON floats are printed with %.17g and read back
    (qmp(hostbus=2.0, hostaddr=3e0), (2, 3)),
    (qmp(hostbus=-0.0, hostaddr=3, hostdevice=None), (None, None)),
])
def test_number_forms_name_the_device_qemu_opens(msg: dict[str, Any], expect: tuple) -> None:  # type: ignore[type-arg]
    if expect == (None, None):
        with pytest.raises(RequestError):
            busaddr(msg)  # hostbus -0.0 reads as 0: no single device
        return
    assert busaddr(msg) == expect


@pytest.mark.parametrize("msg", [
    qmp(hostbus=True, hostaddr=3), qmp(hostbus=2, hostaddr=3.5), qmp(hostbus=2, hostaddr=-3),
    qmp(hostbus=2, hostaddr=2**64), qmp(hostbus=2, hostaddr="3 "), qmp(hostbus=2, hostaddr="08"),
    qmp(hostbus=2**32, hostaddr=3), qmp(hostbus=2, hostaddr=200),
    hmp("device_add usb-host,hostbus=2,hostaddr"), hmp("device_add usb-host,hostbus=2,nohostaddr"),
])
def test_values_qemu_would_not_read_as_one_device_are_refused(msg: dict[str, Any]) -> None:
    with pytest.raises(RequestError):
        device_add_request(msg, {})


def test_json_values_become_qemu_opts_strings() -> None:
    assert [qmp_opt_string(v) for v in ("x", True, False, 5, 2**64 - 1, 1.0, 1e20, 0.1)] == [
        "x", "on", "off", "5", "18446744073709551615", "1", "1e+20", "0.10000000000000001"]
    assert [qmp_opt_string(v) for v in (None, [], {})] == [None, None, None]
    # dropped by QEMU: a null hostport is no hostport
    assert busaddr(qmp(hostbus=2, hostaddr=3, hostport=None)) == (2, 3)


# HMP: QEMU's get_str and command name

@pytest.mark.parametrize(("line", "expect"), [
    # the quoted argument the old gate forwarded unchecked
    ('device_add "usb-host,hostbus=2,hostaddr=2,id=q1"', (2, 2)),
    ('device_add "usb-host,hostbus=\\x"', None),
    ("\tdevice_add\v usb-host,hostbus=2,hostaddr=3 \r\n", (2, 3)),
    ('device_add "driver=usb-host,hostbus=2,hostaddr=3"', (2, 3)),
    ("device_add hostbus=2,driver=usb-host,hostaddr=3", (2, 3)),
    ('device_add "usb-host,hostbus=2,hostaddr=3,id=a\\"b"', (2, 3)),
])
def test_hmp_lines_qemu_adds(line: str, expect: tuple | None) -> None:  # type: ignore[type-arg]
    if expect is None:
        with pytest.raises(RequestError, match="escape"):
            device_add_request(hmp(line), {})
        return
    assert busaddr(hmp(line)) == expect


@pytest.mark.parametrize("line", [
    'device_add "usb-host,hostbus=2,hostaddr=3',  # unterminated
    "device_add usb-host,hostbus=2,hostaddr=3 junk",  # extraneous characters
    "device_add usb-host,hostbus=2,hostaddr=3,id=" + "x" * 1100,  # cut at 1023 bytes by QEMU
    "device_add usb-host,hostbus=2,hostaddr=3,hostbus=5",  # QEMU: last wins
    "device_add usb-host,hostbus=2,hostaddr=3,driver=usb-host",
    "device_add usb-host,help",
])
def test_hmp_lines_the_gate_refuses(line: str) -> None:
    with pytest.raises(RequestError):
        device_add_request(hmp(line), {})


@pytest.mark.parametrize("line", [
    "device_add e1000,id=n1", "Device_add usb-host,hostbus=2,hostaddr=3", "info usbhost",
    "device_add/usb-host,hostbus=2,hostaddr=3", "device_add 'usb-host,hostbus=2,hostaddr=3'",
    "device_add\x1cusb-host,hostbus=2,hostaddr=3", "", "   ", "device_add",
    "device_add usb-host,,x,hostbus=2,hostaddr=3", "device_add e1000,help",
])
def test_hmp_lines_that_add_no_usb_host_pass(line: str) -> None:
    assert device_add_request(hmp(line), {}) is None


def test_hmp_argument_of_1023_bytes_is_read_whole_and_longer_is_refused() -> None:
    # QEMU 7.2 keeps 1023 bytes: at 1024 "hostaddr=35" is read as "hostaddr=3"
    head, tail = "usb-host,hostbus=2,serial=", ",hostaddr=35"
    for size, fill in ((1023, "x"), (1023, "\u00e9"), (1024, "x"), (1024, "\u00e9")):
        room = size - len(head) - len(tail)
        arg = (head + fill * (room // len(fill.encode())) + "x" * (room % len(fill.encode()))
               + tail)
        assert len(arg.encode()) == size
        if size == 1023:
            assert busaddr(hmp("device_add " + arg)) == (2, 35)
        else:
            with pytest.raises(RequestError, match="longer than QEMU reads"):
                device_add_request(hmp("device_add " + arg), {})


def test_qemu_opts_names_values_and_flags() -> None:
    assert qemu_opts_items("a,,b=c,d=e,,f,g,nog,,h=") == (
        [("driver", "a,b=c"), ("d", "e,f"), ("g", "on"), ("g", "off"), ("", "on"),
         ("h", "")], False)
    assert qemu_opts_items(",x=1,") == ([("driver", ""), ("x", "1")], False)
    assert qemu_opts_items("usb-host,?,hostbus=1") == ([("driver", "usb-host")], True)
    assert hmp_device_add_text('device_add "a\\n\\r\\\\\\\'b"') == "a\n\r\\'b"


# hostdevice

def test_hostdevice_paths_qemu_reads_otherwise_are_refused() -> None:
    for path in ("dev/bus/usb/002/003", "5", "", "/proc/self/fd/7", "/dev/fd/7",
                 "/proc/1/root/dev/bus/usb/002/003", "/dev/fdset/x", "/dev/fdset/0x1",
                 "/dev/bus/usb/002/003\x00", "/dev/\ud800", "/x/" + "y" * 5000):
        with pytest.raises(RequestError):
            device_add_request(qmp(hostdevice=path), {1: (STICK,)})
    # a number becomes a relative path for QEMU
    with pytest.raises(RequestError, match="absolute"):
        device_add_request(qmp(hostdevice=5), {})


@pytest.mark.parametrize("path", ["/dev/fdset/1", "/dev/fdset/01", "/dev/fdset/+1",
                                  "/dev/fdset/ 1"])
def test_fdset_numbers_as_qemu_reads_them(path: str) -> None:
    req = device_add_request(qmp(hostdevice=path), {1: (STICK,)})
    assert req is not None and (req.hostbus, req.hostaddr) == (2, 3)


def test_autoscan_forms_are_refused() -> None:
    for args in ({"vendorid": 0x46F4, "productid": 1}, {"hostbus": 2, "hostport": "1"},
                 {"hostbus": 2, "hostaddr": 3, "vendorid": 1},
                 {"hostbus": 2, "hostaddr": 3, "hostport": ""}):
        with pytest.raises(RequestError, match="keep scanning"):
            device_add_request(qmp(**args), {})


# fd sets in the session


def session_with(idents: dict[int, FdIdentity]) -> Session:
    return Session(identify=lambda fd: idents[fd])


def send(s: Session, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> list[Action]:
    return s.from_client(json.dumps(msg).encode(), fds)


def add_fd(s: Session, fd: int | None, fdset: int, qemu_fd: int) -> None:
    send(s, {"execute": "add-fd", "arguments": {"fdset-id": fdset}},
         (fd,) if fd is not None else ())
    s.from_server(json.dumps({"return": {"fdset-id": fdset, "fd": qemu_fd}}).encode() + b"\r\n")


def test_remove_fd_of_one_descriptor_forgets_nothing() -> None:
    s = session_with({10: STICK, 11: OTHER, 12: STICK})
    add_fd(s, 10, 1, 40)
    add_fd(s, 11, 1, 41)
    send(s, {"execute": "remove-fd", "arguments": {"fdset-id": 1, "fd": 41}})
    s.from_server(b'{"return": {}}\r\n')
    add_fd(s, 12, 1, 42)
    acts = send(s, qmp(hostdevice="/dev/fdset/1"))
    replies = [json.loads(a.raw) for a in acts if isinstance(a, ToClient)]
    assert replies and "several devices" in replies[0]["error"]["desc"]


def test_a_removed_set_re_added_still_holds_its_old_device() -> None:
    s = session_with({10: OTHER, 12: STICK})
    add_fd(s, 10, 3, 40)
    send(s, {"execute": "remove-fd", "arguments": {"fdset-id": 3}})
    s.from_server(b'{"return": {}}\r\n')
    add_fd(s, 12, 3, 42)
    acts = send(s, qmp(hostdevice="/dev/fdset/3"))
    assert not [a for a in acts if isinstance(a, Ask)]


def test_add_fd_without_its_own_fd_makes_the_set_unknown() -> None:
    s = session_with({10: STICK})
    add_fd(s, 10, 2, 40)
    add_fd(s, None, 2, 41)  # QEMU takes an fd an earlier message left behind
    acts = send(s, qmp(hostdevice="/dev/fdset/2"))
    assert not [a for a in acts if isinstance(a, Ask)]
    s2 = session_with({10: STICK})
    add_fd(s2, 10, 2, 40)
    acts = send(s2, qmp(hostdevice="/dev/fdset/2"))
    assert [type(a) for a in acts] == [Ask]


# no input in these classes raises anything but a refusal

_text = st.text(
    alphabet=st.sampled_from(list('usb-hot,=" \\\t\x0b0123x/dfe_vnpia?\x00\u00e9\ud800')),
    max_size=60)
_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                     | st.floats(allow_nan=False) | _text | st.builds("/".__add__, _text),
                     lambda inner: st.lists(inner, max_size=2), max_leaves=3)


@settings(max_examples=300, deadline=None)
@given(line=_text, args=st.dictionaries(
    st.sampled_from(["driver", "hostbus", "hostaddr", "hostport", "vendorid", "productid",
                     "hostdevice", "id", "x"]), _json, max_size=6))
def test_no_input_escapes_as_anything_but_a_refusal(line: str, args: dict[str, Any]) -> None:
    for msg in (hmp(line), hmp("device_add " + line), hmp('device_add "usb-host,' + line),
                {"execute": "device_add", "arguments": {"driver": "usb-host", **args}}):
        acts = send(session_with({}), msg)
        assert acts
        texts = [json.loads(a.raw)["error"]["desc"] for a in acts if isinstance(a, ToClient)]
        assert all("\n" not in t and t.startswith("safeusb: ") for t in texts)
        # refusals name their reason; none comes from the session's last-resort catch
        assert not [t for t in texts if "could not read" in t], texts
