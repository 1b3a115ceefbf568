"""The gate's QMP session: every decision about the stream between libvirt and QEMU, as
actions for the I/O loop (gate.proxy), touching no socket; a usb-host device_add reaches
QEMU only once the decision allows it."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from safeusb.errors import SafeUSBError
from safeusb.gate.qemu_usb_host import (
    UNSEEN_FD,
    UsbHostRequest,
    device_add_request,
)
from safeusb.gate.qmp import (
    ClientStream,
    Kind,
    LineStream,
    QMPParseError,
    Segment,
    command_name,
    encode,
    error_reply,
    is_response,
    parse_message,
)
from safeusb.host.usbfs import FdIdentity, fd_identity
from safeusb.values import frozen

KEEPALIVE_FDNAME = "safeusb-keepalive"
FDSETS_ID = "safeusb-fdsets"
DECISION_TIMEOUT = 30.0

# What the session asks the I/O loop to do


@frozen
class ToServer:
    raw: bytes
    fds: tuple[int, ...] = ()
    owned: bool = True  # the gate's copies: closed once sent


@frozen
class ToClient:
    raw: bytes


@frozen
class Ask:
    token: int
    request: UsbHostRequest


@frozen
class CloseFds:
    fds: tuple[int, ...]


@frozen
class Log:
    text: str


Action = ToServer | ToClient | Ask | CloseFds | Log


_NO_ID: Any = object()  # a command sent without an "id"


@dataclass
class _Expect:
    """A response the client is owed, in order."""

    kind: str  # forward | swallow | local
    name: str | None = None
    reply: bytes = b""
    fdset: int | None = None
    idents: tuple[FdIdentity, ...] = ()
    id: Any = _NO_ID  # the command's "id" as sent


_OWN_IDS = frozenset((KEEPALIVE_FDNAME, FDSETS_ID))


def _same_id(a: Any, b: Any) -> bool:
    """Whether QEMU's echo of an id is that id: JSON equality, with numbers compared by
    value (QEMU re-prints them) and booleans never equal to numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        try:
            return a == b if type(a) is type(b) else float(a) == float(b)
        except OverflowError:
            return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same_id, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_id(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@dataclass
class _Pending:
    token: int
    segment: Segment
    message: Any
    request: UsbHostRequest


def _args_of(msg: Any) -> dict[str, Any]:
    args = msg.get("arguments") if isinstance(msg, dict) else None
    return args if isinstance(args, dict) else {}


@dataclass
class Session:
    """One client connection's QMP stream, both directions.

    Commands reach QEMU in the client's order; a usb-host device_add waits for its
    decision and holds back the commands behind it (never events or responses).
    Responses are owed in command order (QMP answers in-band commands in order), so
    local refusals go out exactly where QEMU's answer would have.
    """

    keepalive_fd: int | None = None
    domain: str | None = None
    identify: Callable[[int], FdIdentity] = fd_identity
    fdsets: dict[int, tuple[FdIdentity, ...]] = field(default_factory=dict)
    _stream: ClientStream = field(default_factory=ClientStream)
    _lines: LineStream = field(default_factory=LineStream)
    _expect: deque[_Expect] = field(default_factory=deque)
    _oob: dict[str, _Expect] = field(default_factory=dict)
    _held: deque[Segment] = field(default_factory=deque)
    _pending: _Pending | None = None
    _tokens: int = 0
    keepalive_sent: bool = False
    _negotiated: bool = False
    _known_fds: set[tuple[int, int]] = field(default_factory=set)  # (set, QEMU's fd) added here

    # client -> QEMU

    def from_client(self, data: bytes, fds: Sequence[int] = ()) -> list[Action]:
        self._held.extend(self._stream.feed(data, fds))
        return self._drain()

    def decided(self, token: int, refusal: str | None, seconds: float | None = None
                ) -> list[Action]:
        """The decision for a held device_add: None allows it, a text refuses it."""
        p = self._pending
        if p is None or p.token != token:
            return []
        self._pending = None
        what = p.request.describe()
        if refusal is None:
            took = f" (decided in {seconds * 1000:.0f} ms)" if seconds is not None else ""
            out: list[Action] = [Log(f"allowed {what}{took}")]
            out += self._forward(p.segment, p.message)
        else:
            out = [Log(f"refused {what}: {refusal}"), CloseFds(p.segment.fds)]
            out += self._local(error_reply(f"safeusb: {refusal}", p.message))
        return out + self._drain()

    @property
    def waiting(self) -> int | None:
        """The token of the decision being waited for, if any."""
        return self._pending.token if self._pending else None

    def abandon(self) -> tuple[int, ...]:
        """The client is gone: every fd still held (the caller closes them)."""
        fds = list(self._stream.take_pending_fds())
        if self._pending is not None:
            fds += self._pending.segment.fds
        for seg in self._held:
            fds += seg.fds
        self._pending, self._held = None, deque()
        return tuple(fds)

    def _drain(self) -> list[Action]:
        out: list[Action] = []
        while self._held and self._pending is None:
            out += self._segment(self._held.popleft())
        return out

    def _segment(self, seg: Segment) -> list[Action]:
        if seg.kind is Kind.SPACE:
            return [ToServer(seg.raw)]
        if seg.kind is Kind.JUNK:
            return [CloseFds(seg.fds), *self._local(
                error_reply("safeusb: not a JSON object; not passed to QEMU"))]
        if seg.kind is Kind.OVERSIZE:
            return [CloseFds(seg.fds), *self._local(
                error_reply("safeusb: message too large; not passed to QEMU"))]
        try:
            msg = parse_message(seg.raw)
        except QMPParseError as exc:
            return [CloseFds(seg.fds), *self._local(
                error_reply(f"safeusb: not strict JSON ({exc}); not passed to QEMU"))]
        try:
            request = self._usb_host(msg)
        except SafeUSBError as exc:
            return [Log(f"refused device_add: {exc}"), CloseFds(seg.fds),
                    *self._local(error_reply(f"safeusb: {exc}", msg))]
        except Exception as exc:  # a reading the gate cannot finish: refuse, never crash
            why = f"the gate could not read this command ({type(exc).__name__})"
            return [Log(f"refused: {why}: {exc}"), CloseFds(seg.fds),
                    *self._local(error_reply(f"safeusb: {why}", msg))]
        if request is not None:
            self._tokens += 1
            self._pending = _Pending(self._tokens, seg, msg, request)
            return [Ask(self._tokens, request)]
        return self._forward(seg, msg)

    def _usb_host(self, msg: Any) -> UsbHostRequest | None:
        return device_add_request(msg, self.fdsets, self.domain)

    def _forward(self, seg: Segment, msg: Any) -> list[Action]:
        name = command_name(msg)
        exp = _Expect("forward", name, id=msg.get("id", _NO_ID) if isinstance(msg, dict)
                      else _NO_ID)
        if name == "add-fd":
            # QEMU puts the first fd it holds in the set; without fds of its own, an
            # add-fd takes what an earlier message left: the set is then unknown.
            exp.idents = tuple(self.identify(fd) for fd in seg.fds) or (UNSEEN_FD,)
        if name in ("add-fd", "remove-fd"):
            fdset = _args_of(msg).get("fdset-id")
            exp.fdset = fdset if isinstance(fdset, int) and not isinstance(fdset, bool) else None
        if isinstance(msg, dict) and "exec-oob" in msg and "id" in msg:
            self._oob[encode({"id": msg["id"]}).decode()] = exp
        else:
            self._expect.append(exp)
        return [ToServer(seg.raw, seg.fds)]

    def _local(self, reply: bytes) -> list[Action]:
        self._expect.append(_Expect("local", reply=reply))
        return self._flush_local()

    def _flush_local(self) -> list[Action]:
        out: list[Action] = []
        while self._expect and self._expect[0].kind == "local":
            out.append(ToClient(self._expect.popleft().reply))
        return out

    # QEMU -> client

    def from_server(self, data: bytes) -> list[Action]:
        out: list[Action] = []
        for line in self._lines.feed(data):
            out += self._server_line(line)
        return out

    def _server_line(self, line: bytes) -> list[Action]:
        try:
            msg = parse_message(line)
        except QMPParseError:
            return [ToClient(line)]
        if not is_response(msg):
            return [ToClient(line)]
        exp = None
        if self._oob and "id" in msg:
            exp = self._oob.pop(encode({"id": msg["id"]}).decode(), None)
        if exp is None and self._expect:
            if "id" in msg and not _same_id(msg["id"], self._expect[0].id):
                return self._stale(line, msg["id"])
            # no id: the answer to a command sent without one, or QEMU's refusal of one
            # it could not read (sent without the id)
            exp = self._expect.popleft()
        out: list[Action] = []
        if exp is not None and exp.kind == "swallow":
            if "error" in msg:
                out.append(Log(f"{exp.name} ({exp.reply.decode()}) failed: {msg['error']}"))
            elif exp.name == "query-fdsets":
                self._held_before(msg["return"])
        else:
            out.append(ToClient(line))
            if exp is not None and "return" in msg:
                out += self._answered(exp, msg["return"])
        return out + self._flush_local()

    def _stale(self, line: bytes, rid: Any) -> list[Action]:
        """An answer to no command of this session: QEMU ran a command of the session
        before (it had taken it off the monitor's queue when that client left) and answers
        on the connection it has now. The gate's own answers stop here; the client's go to
        the client (libvirt drops answers it is not waiting for). Pairing stays as it was."""
        if isinstance(rid, str) and rid in _OWN_IDS:
            return [Log(f"dropped an answer to the gate's {rid} of an earlier session")]
        return [ToClient(line)]

    def _answered(self, exp: _Expect, ret: Any) -> list[Action]:
        if exp.name == "qmp_capabilities" and not self._negotiated:
            self._negotiated = True
            out: list[Action] = []
            if self.keepalive_fd is not None and not self.keepalive_sent:
                self.keepalive_sent = True
                self._expect.append(_Expect("swallow", "getfd", reply=b"keepalive",
                                            id=KEEPALIVE_FDNAME))
                cmd = {"execute": "getfd", "arguments": {"fdname": KEEPALIVE_FDNAME},
                       "id": KEEPALIVE_FDNAME}
                out.append(ToServer(encode(cmd), (self.keepalive_fd,), owned=False))
            # fd sets QEMU already holds (from its command line, or an earlier session)
            self._expect.append(_Expect("swallow", "query-fdsets", reply=b"existing sets",
                                        id=FDSETS_ID))
            out.append(ToServer(encode({"execute": "query-fdsets", "id": FDSETS_ID})))
            return out
        if exp.name == "add-fd":
            fdset = ret.get("fdset-id") if isinstance(ret, dict) else exp.fdset
            if isinstance(fdset, int):
                self.fdsets[fdset] = self.fdsets.get(fdset, ()) + exp.idents
                qemu_fd = ret.get("fd") if isinstance(ret, dict) else None
                if isinstance(qemu_fd, int):
                    self._known_fds.add((fdset, qemu_fd))
        # remove-fd forgets nothing: QEMU keeps a removed fd in its set, and may still
        # hand it out, while the guest is paused or a dup of it is open (monitor/fds.c),
        # so a set stands for everything ever added to it.
        return []

    def _held_before(self, sets: Any) -> None:
        """query-fdsets at the start of the session: a set holding an fd this session did
        not add has content the gate never saw, so it stands for an unknown fd."""
        if not isinstance(sets, list):
            return
        for entry in sets:
            fdset = entry.get("fdset-id") if isinstance(entry, dict) else None
            fds = entry.get("fds") if isinstance(entry, dict) else None
            if not isinstance(fdset, int) or not isinstance(fds, list):
                continue
            unseen = [f for f in fds if not isinstance(f, dict)
                      or (fdset, f.get("fd")) not in self._known_fds]
            if unseen and UNSEEN_FD not in self.fdsets.get(fdset, ()):
                self.fdsets[fdset] = (*self.fdsets.get(fdset, ()), UNSEEN_FD)

