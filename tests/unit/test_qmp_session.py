"""The gate's session replayed against a recorded libvirt<->QEMU conversation.

tests/unit/data/qmp/hotplug.jsonl was recorded from QEMU 7.2 by tools/record_qmp.py. The
replay plays QEMU: each command the session forwards is answered with exactly the lines
QEMU sent after it in the recording.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeusb.gate.qemu_usb_host import UsbHostRequest
from safeusb.gate.qmp import error_reply
from safeusb.gate.session import (
    FDSETS_ID,
    KEEPALIVE_FDNAME,
    Action,
    Ask,
    CloseFds,
    Log,
    Session,
    ToClient,
    ToServer,
)
from safeusb.host.usbfs import FdIdentity

DATA = Path(__file__).parent / "data" / "qmp"
KEEPALIVE_FD = 900


def load(name: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


@dataclass
class Replay:
    conv: list[dict]  # type: ignore[type-arg]
    decide: Callable[[UsbHostRequest], str | None]
    split: Callable[[bytes], list[bytes]] = lambda b: [b]
    session: Session = field(init=False)
    answers: dict[str, list[str]] = field(default_factory=dict)
    fd_for: dict[str, int] = field(default_factory=dict)
    idents: dict[int, FdIdentity] = field(default_factory=dict)
    to_client: list[bytes] = field(default_factory=list)
    to_server: list[tuple[bytes, tuple[int, ...]]] = field(default_factory=list)
    asked: list[UsbHostRequest] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    fdsets_before: list[dict] = field(default_factory=list)  # type: ignore[type-arg]

    def __post_init__(self) -> None:
        self.session = Session(KEEPALIVE_FD, "rec", identify=lambda fd: self.idents[fd])
        last = None
        for n, item in enumerate(self.conv):
            if item["from"] == "libvirt":
                last = item["raw"].rstrip("\r\n")
                self.answers[last] = []
                for k, fd in enumerate(item["fds"]):
                    num = 100 + 10 * n + k
                    self.fd_for.setdefault(last, num)
                    self.idents[num] = FdIdentity(fd["path"], tuple(fd["rdev"]))
            elif last is not None:
                self.answers[last].append(item["raw"])

    def run(self) -> None:
        self.server(self.conv[0]["raw"].encode())
        for item in self.conv:
            if item["from"] != "libvirt":
                continue
            raw = item["raw"].encode()
            fd = self.fd_for.get(item["raw"].rstrip("\r\n"))
            for i, chunk in enumerate(self.split(raw)):
                self.apply(self.session.from_client(chunk, [fd] if fd and i == 0 else []))

    def server(self, data: bytes) -> None:
        for chunk in self.split(data):
            self.apply(self.session.from_server(chunk))

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, ToClient):
                self.to_client.append(a.raw)
            elif isinstance(a, ToServer):
                self.to_server.append((a.raw, a.fds))
                self.qemu(a)
            elif isinstance(a, Ask):
                self.asked.append(a.request)
                self.apply(self.session.decided(a.token, self.decide(a.request)))
            elif isinstance(a, CloseFds):
                self.closed += a.fds
            else:
                assert isinstance(a, Log)

    def qemu(self, a: ToServer) -> None:
        text = a.raw.decode().rstrip("\r\n")
        if not text:
            return
        cmd = json.loads(text)
        if cmd.get("id") == KEEPALIVE_FDNAME:
            assert a.fds == (KEEPALIVE_FD,) and not a.owned
            self.server(b'{"return": {}, "id": "safeusb-keepalive"}\r\n')
            return
        if cmd.get("id") == FDSETS_ID:
            assert cmd["execute"] == "query-fdsets" and not a.fds
            self.server(json.dumps({"return": self.fdsets_before, "id": FDSETS_ID}).encode()
                        + b"\r\n")
            return
        expected_fd = self.fd_for.get(text)
        assert a.fds == ((expected_fd,) if expected_fd else ())
        self.server("".join(self.answers[text]).encode())


def client_view(conv: list[dict], refused: dict[str, str]) -> bytes:  # type: ignore[type-arg]
    """What libvirt should read: QEMU's lines, or the gate's error for refused commands."""
    out, skip = [conv[0]["raw"].encode()], False
    for item in conv[1:]:
        if item["from"] == "libvirt":
            cmd = json.loads(item["raw"])
            reason = refused.get(cmd["id"])
            skip = reason is not None
            if skip:
                out.append(error_reply(f"safeusb: {reason}", cmd))
        elif not skip:
            out.append(item["raw"].encode())
    return b"".join(out)


def allow(_r: UsbHostRequest) -> None:
    return None


def test_allowed_conversation_passes_byte_for_byte_with_fds() -> None:
    conv = load("hotplug.jsonl")
    r = Replay(conv, allow)
    r.run()
    assert b"".join(r.to_client) == client_view(conv, {})
    sent = b"".join(raw for raw, _fds in r.to_server if b'"id": "safeusb-' not in raw)
    assert sent == b"".join(i["raw"].encode() for i in conv if i["from"] == "libvirt")
    keepalive = [raw for raw, _ in r.to_server if KEEPALIVE_FDNAME.encode() in raw]
    assert len(keepalive) == 1 and b'"getfd"' in keepalive[0]
    own = [raw for raw, _ in r.to_server if FDSETS_ID.encode() in raw]
    assert len(own) == 1 and b'"query-fdsets"' in own[0]
    assert [(q.hostbus, q.hostaddr, q.hostdevice) for q in r.asked] == [
        (2, 3, "/dev/fdset/0"), (2, 3, "/dev/bus/usb/002/003"), (2, 3, None)]
    assert r.asked[0].domain == "rec" and r.asked[0].device_id == "hostdev0"


def refuse_all(q: UsbHostRequest) -> str | None:
    return f"/dev/sdb1 mounted at /media/stick ({q.describe()})"


def test_refused_device_add_never_reaches_qemu_and_libvirt_reads_the_reason() -> None:
    conv = load("hotplug.jsonl")
    r = Replay(conv, refuse_all)
    r.run()
    refused = {f"libvirt-{n}": refuse_all(q) for n, q in zip((8, 10, 11), r.asked, strict=True)}
    assert b"".join(r.to_client) == client_view(conv, refused)  # type: ignore[arg-type]
    assert not [raw for raw, _ in r.to_server if b"usb-host" in raw]
    errors = [json.loads(x) for x in r.to_client if b"safeusb:" in x]
    assert [e["id"] for e in errors] == ["libvirt-8", "libvirt-10", "libvirt-11"]
    assert errors[0]["error"]["desc"].startswith("safeusb: /dev/sdb1 mounted at /media/stick")


def test_a_crash_in_resolution_refuses_only_that_command() -> None:
    conv = load("hotplug.jsonl")
    # an fd set nobody added: the gate cannot tell the device, so it refuses
    for item in conv:
        item["raw"] = item["raw"].replace('"/dev/fdset/0"', '"/dev/fdset/7"')
    r = Replay(conv, allow)
    r.run()
    errors = [json.loads(x) for x in r.to_client if b"safeusb:" in x]
    assert [e["id"] for e in errors] == ["libvirt-8"]
    assert "fd set 7 was never seen" in errors[0]["error"]["desc"]


def test_a_set_qemu_held_before_the_session_is_unknown() -> None:
    # libvirt adds fd set 0 for the stick; QEMU already held an fd in set 0 (its command
    # line, or an earlier session): QEMU may open that one, so the gate refuses
    conv = load("hotplug.jsonl")
    r = Replay(conv, allow, fdsets_before=[{"fdset-id": 0, "fds": [{"fd": 5}]}])
    r.run()
    errors = [json.loads(x) for x in r.to_client if b"safeusb:" in x]
    assert [e["id"] for e in errors] == ["libvirt-8"]
    assert "did not come with its add-fd" in errors[0]["error"]["desc"]
    # sets the gate saw filled are not affected by sets QEMU lists with those same fds
    r2 = Replay(load("hotplug.jsonl"), allow, fdsets_before=[{"fdset-id": 9, "fds": []}])
    r2.run()
    assert not [x for x in r2.to_client if b"safeusb:" in x]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_split_of_both_streams_gives_the_same_conversation(data) -> None:  # type: ignore[no-untyped-def]
    def split(b: bytes) -> list[bytes]:
        cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(b) - 1)), max_size=4))))
        parts, prev = [], 0
        for c in [*cuts, len(b)]:
            if c > prev:
                parts.append(b[prev:c])
                prev = c
        return parts

    conv = load("hotplug.jsonl")
    r = Replay(conv, refuse_all, split)
    r.run()
    whole = Replay(conv, refuse_all)
    whole.run()
    assert b"".join(r.to_client) == b"".join(whole.to_client)
    assert b"".join(x for x, _ in r.to_server) == b"".join(x for x, _ in whole.to_server)


def test_commands_behind_a_pending_decision_wait_but_events_pass() -> None:
    s = Session()
    acts = s.from_client(b'{"execute":"device_add","arguments":{"driver":"usb-host",'
                         b'"hostbus":1,"hostaddr":2},"id":1}{"execute":"query-status","id":2}')
    assert [type(a) for a in acts] == [Ask]
    ev = b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}\r\n'
    assert s.from_server(ev) == [ToClient(ev)]
    token = s.waiting
    assert token is not None
    acts = s.decided(token, "in use")
    assert [type(a) for a in acts] == [Log, CloseFds, ToClient, ToServer]
    assert json.loads(acts[2].raw)["id"] == 1  # type: ignore[union-attr]
    assert acts[3].raw == b'{"execute":"query-status","id":2}'  # type: ignore[union-attr]


def test_local_refusal_waits_for_earlier_answers() -> None:
    s = Session()
    s.from_client(b'{"execute":"query-status","id":1}')
    acts = s.from_client(b'{"execute":"device_add","arguments":{"driver":"usb-host"},"id":2}')
    assert not [a for a in acts if isinstance(a, ToClient)]  # names no device: refused later
    acts = s.from_server(b'{"return": {}, "id": 1}\r\n')
    assert [json.loads(a.raw)["id"] for a in acts if isinstance(a, ToClient)] == [1, 2]


@pytest.mark.parametrize("line", [
    b"device_add usb-host,hostbus=1,hostaddr=2",
    b"  device_add   driver=usb-host,hostbus=1,hostaddr=2,id=x",
])
def test_hmp_device_add_is_held_like_qmp(line: bytes) -> None:
    s = Session()
    msg = {"execute": "human-monitor-command", "arguments": {"command-line": line.decode()}}
    acts = s.from_client(json.dumps(msg).encode())
    assert [type(a) for a in acts] == [Ask]
    assert acts[0].request.via == "human-monitor-command"  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", [
    b"{'execute':'device_add','arguments':{'driver':'usb-host','hostbus':1,'hostaddr':2}}",
    b'{"execute":"device_add","arguments":{"driver":"usb-host","driver":"usb-kbd"}}',
    b'"device_add"', b"]",
])
def test_what_is_not_strict_json_never_reaches_qemu(raw: bytes) -> None:
    acts = Session().from_client(raw + b"\r\n")
    assert not [a for a in acts if isinstance(a, ToServer) and a.raw.strip()]
    replies = [json.loads(a.raw) for a in acts if isinstance(a, ToClient)]
    assert len(replies) == 1 and replies[0]["error"]["desc"].startswith("safeusb: ")


def test_other_drivers_pass_without_a_decision() -> None:
    raw = b'{"execute":"device_add","arguments":{"driver":"usb-storage","drive":"d"},"id":3}'
    assert Session().from_client(raw) == [ToServer(raw)]


def test_an_answer_left_from_an_earlier_session_pairs_with_nothing() -> None:
    """QEMU answers a command the last client's session sent (taken off its queue before
    that client left) on the next connection: the gate's own answer is dropped, libvirt's is
    passed on, and each command of the new session still gets its own answer."""
    s = Session(KEEPALIVE_FD, "rec")
    s.from_client(b'{"execute": "qmp_capabilities", "id": "c1"}\r\n')
    stale_own = (b'{"id": "safeusb-keepalive", "error": {"class": "GenericError", '
                 b'"desc": "No file descriptor supplied via SCM_RIGHTS"}}\r\n')
    acts = s.from_server(stale_own)
    assert [a for a in acts if isinstance(a, ToClient)] == []
    assert any(isinstance(a, Log) and "earlier session" in a.text for a in acts)
    stale_theirs = b'{"return": {}, "id": "libvirt-7"}\r\n'
    assert s.from_server(stale_theirs) == [ToClient(stale_theirs)]
    acts = s.from_server(b'{"return": {}, "id": "c1"}\r\n')
    assert ToClient(b'{"return": {}, "id": "c1"}\r\n') in acts
    sent = [json.loads(a.raw) for a in acts if isinstance(a, ToServer)]
    assert [m["id"] for m in sent] == [KEEPALIVE_FDNAME, FDSETS_ID]  # negotiated: it went on
    s.identify = lambda fd: FdIdentity("/dev/bus/usb/001/002", (189, 1))
    s.from_client(b'{"execute": "add-fd", "arguments": {"fdset-id": 3}, "id": "c2"}', (5,))
    for line in (b'{"return": {}, "id": "safeusb-keepalive"}\r\n',
                 b'{"return": [], "id": "safeusb-fdsets"}\r\n'):
        assert [a for a in s.from_server(line) if isinstance(a, ToClient)] == []
    reply = b'{"return": {"fdset-id": 3, "fd": 40}, "id": "c2"}\r\n'
    assert s.from_server(reply) == [ToClient(reply)]
    assert s.fdsets[3] == (FdIdentity("/dev/bus/usb/001/002", (189, 1)),)


def test_an_answer_without_an_id_is_the_next_commands() -> None:
    """QEMU answers a command it could not read without its id: it still pairs."""
    s = Session(None, "rec")
    s.from_client(b'{"execute": "query-status", "id": 1}\r\n')
    s.from_client(b'{"execute": "query-name", "id": 2}\r\n')
    s.from_server(b'{"error": {"class": "GenericError", "desc": "x"}}\r\n')
    assert s.from_server(b'{"return": {}, "id": 2}\r\n') == [
        ToClient(b'{"return": {}, "id": 2}\r\n')]
    assert s.from_server(b'{"return": {}, "id": 2}\r\n') == [
        ToClient(b'{"return": {}, "id": 2}\r\n')]  # nothing owed: passed on as is
