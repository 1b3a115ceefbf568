"""QMP streams: framing both directions, strict message parsing, replies, fd passing.

A client (libvirt) writes JSON values back to back; QEMU reads them with a lenient
lexer of its own (single-quoted strings, for one). The gate forwards to QEMU only values
that a strict JSON parser accepts, byte for byte, plus the whitespace between them, so
QEMU can never read a value differently from the gate. Anything else is answered by the
gate and never reaches QEMU.

QEMU writes one JSON object per line ending in CRLF; its strings never hold a raw newline.
"""

from __future__ import annotations

import array
import enum
import json
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from safeusb import strictjson
from safeusb.values import frozen

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_FDS_PER_MESSAGE = 253  # SCM_MAX_FD
RECV_BYTES = 256 * 1024


class QMPParseError(ValueError):
    """A value that is not strict JSON (duplicate keys, NaN, bad UTF-8, ...)."""


class Kind(enum.Enum):
    VALUE = "value"  # a complete top-level {...} or [...]
    SPACE = "space"  # whitespace between values
    JUNK = "junk"  # anything else at top level: scalars, stray brackets, garbage
    OVERSIZE = "oversize"  # a value larger than the limit; its bytes are not kept


@frozen
class Segment:
    kind: Kind
    raw: bytes
    fds: tuple[int, ...] = ()


_WS = frozenset(b" \t\r\n")
_IN_VALUE = re.compile(rb"[\"'{}\[\]]")
_IN_JUNK = re.compile(rb"[ \t\r\n{\[\"']")
_IN_STRING = {ord('"'): re.compile(rb'["\\]'), ord("'"): re.compile(rb"['\\]")}
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")


@dataclass
class ClientStream:
    """Splits a client's byte stream into segments; fds go with the value they came with.

    SCM_RIGHTS data arrives with the first byte of the sender's write, and a client sends
    the fds for a command with that command's first byte. So the fds received in one read
    belong to the first value that starts in that read; if none starts there, to the value
    in progress; if none is in progress, to the next one.
    """

    max_bytes: int = MAX_MESSAGE_BYTES
    _buf: bytearray = field(default_factory=bytearray)
    _kind: Kind | None = None
    _depth: int = 0
    _quote: int | None = None
    _escape: bool = False
    _oversize: bool = False
    _fds: list[int] = field(default_factory=list)
    _pending: list[int] = field(default_factory=list)

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> list[Segment]:
        out: list[Segment] = []
        self._pending.extend(fds)
        i, n = 0, len(data)
        while i < n:
            if self._kind is None:
                j = i
                while j < n and data[j] in _WS:
                    j += 1
                if j > i:
                    out.append(Segment(Kind.SPACE, data[i:j]))
                    i = j
                    continue
                self._start(Kind.VALUE if data[i] in _OPEN else Kind.JUNK)
            start = i
            i, done = self._scan(data, i)
            self._keep(data[start:i])
            if done:
                out.append(self._finish())
        if self._pending and self._kind is not None:
            self._fds.extend(self._pending)
            self._pending = []
        return out

    def take_pending_fds(self) -> list[int]:
        """Fds not given to any value yet (the stream ended); the caller closes them."""
        fds = self._pending + (self._fds if self._kind is not None else [])
        self._pending, self._fds = [], []
        return fds

    def _start(self, kind: Kind) -> None:
        self._kind, self._depth, self._quote, self._escape = kind, 0, None, False
        self._oversize = False
        self._buf = bytearray()
        self._fds, self._pending = self._pending, []

    def _keep(self, chunk: bytes) -> None:
        if self._oversize:
            return
        self._buf += chunk
        if len(self._buf) > self.max_bytes:
            self._oversize = True
            self._buf = bytearray()

    def _finish(self) -> Segment:
        assert self._kind is not None
        kind = Kind.OVERSIZE if self._oversize else self._kind
        seg = Segment(kind, bytes(self._buf), tuple(self._fds))
        self._kind, self._buf, self._fds = None, bytearray(), []
        return seg

    def _scan(self, data: bytes, i: int) -> tuple[int, bool]:
        """Advance through the segment in progress: (next index, segment complete)."""
        n = len(data)
        while i < n:
            if self._quote is not None:
                if self._escape:
                    self._escape = False
                    i += 1
                    continue
                m = _IN_STRING[self._quote].search(data, i)
                if m is None:
                    return n, False
                j = m.start()
                if data[j] == self._quote:
                    self._quote = None
                    i = j + 1
                else:
                    self._escape = True
                    i = j + 1
                continue
            if self._kind is Kind.JUNK:
                m = _IN_JUNK.search(data, i)
                if m is None:
                    return n, False
                j = m.start()
                c = data[j]
                if c in _IN_STRING:
                    self._quote = c
                    i = j + 1
                    continue
                return j, True
            m = _IN_VALUE.search(data, i)
            if m is None:
                return n, False
            j = m.start()
            c = data[j]
            i = j + 1
            if c in _IN_STRING:
                self._quote = c
            elif c in _OPEN:
                self._depth += 1
            elif c in _CLOSE:
                self._depth -= 1
                if self._depth == 0:
                    return i, True
        return i, False


@dataclass
class LineStream:
    """QEMU's output: complete lines (with their line ending), in order."""

    _buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        end = self._buf.rfind(b"\n")
        if end < 0:
            return []
        done = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        return [line + b"\n" for line in done.split(b"\n")[:-1]]

    @property
    def pending(self) -> bytes:
        return bytes(self._buf)


def parse_message(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, no control characters."""
    try:
        return strictjson.loads(raw)
    except ValueError as exc:
        raise QMPParseError(str(exc)) from None


def encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\r\n"


def error_reply(desc: str, request: Any = None, error_class: str = "GenericError") -> bytes:
    """A QMP error response; echoes the request's id when it has one (any JSON type)."""
    reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if isinstance(request, dict) and "id" in request:
        reply["id"] = request["id"]
    return encode(reply)


def command_name(msg: Any) -> str | None:
    """The command a client message runs (execute or exec-oob), if it names one."""
    if not isinstance(msg, dict):
        return None
    name = msg.get("execute", msg.get("exec-oob"))
    return name if isinstance(name, str) else None


def is_response(msg: Any) -> bool:
    return isinstance(msg, dict) and ("return" in msg or "error" in msg) and "event" not in msg


# fd passing


def recv_with_fds(sock: socket.socket, bufsize: int = RECV_BYTES) -> tuple[bytes, list[int]]:
    """One read; the fds that came with it (close-on-exec). b'' means end of stream."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        bufsize, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % fds.itemsize
            fds.frombytes(cdata[:usable])
    return data, list(fds)


def send_with_fds(sock: socket.socket, data: bytes, fds: Iterable[int] = ()) -> int:
    """One write; fds (if any) go with its first byte. Returns bytes written."""
    fd_list = list(fds)
    if not fd_list:
        return sock.send(data)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fd_list).tobytes())]
    return sock.sendmsg([data], anc)
