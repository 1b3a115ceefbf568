"""The gate: QEMU's emulator path for a protected domain, guarding its QMP monitor.

libvirt starts the domain's `<emulator>` with QEMU's full argument list. The gate swaps the
monitor's listening socket for a private one, starts a proxy process, and execs the real
QEMU in its own process, so libvirt's pid is QEMU's: libvirt's kill, cgroups and
statistics act on QEMU itself. The proxy passes every QMP message through unchanged,
fds included, except `device_add` of a `usb-host` device, which reaches QEMU only if the
decision allows it; otherwise libvirt gets a QMP error naming the reason.

If the proxy dies, the guest keeps running: right after capability negotiation the proxy
hands QEMU (with `getfd`, name `safeusb-keepalive`) a copy of its end of libvirt's
connection, so libvirt never sees the monitor end while QEMU lives. Monitor commands then
get no answer (no device reaches the guest: fail closed); `virsh destroy` still ends the
guest, and when QEMU exits libvirt sees the end of the monitor as usual.

Session holds the decisions about the stream and touches no socket; run_proxy does the I/O.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import queue
import selectors
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from safeusb.errors import EXIT_IN_USE, EXIT_USAGE, SafeUSBError, UsageError
from safeusb.gate.qemu_usb_host import (
    UNSEEN_FD,
    Decide,
    UsbHostRequest,
    device_add_request,
    prepare_decision,
)
from safeusb.gate.qemuargs import (
    MonitorArgsError,
    MonitorSocket,
    domain_name,
    find_monitor,
    with_monitor_fd,
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
    recv_with_fds,
    send_with_fds,
)
from safeusb.host.usbfs import FdIdentity, fd_identity

PROG = "safeusb-qemu-gate"
GATE_ROOT = "/usr/local/lib/safeusb/gate"
KEEPALIVE_FDNAME = "safeusb-keepalive"
FDSETS_ID = "safeusb-fdsets"
DECISION_TIMEOUT = 30.0


# What the session asks the I/O loop to do


@dataclass(frozen=True)
class ToServer:
    raw: bytes
    fds: tuple[int, ...] = ()
    owned: bool = True  # the gate's copies: closed once sent


@dataclass(frozen=True)
class ToClient:
    raw: bytes


@dataclass(frozen=True)
class Ask:
    token: int
    request: UsbHostRequest


@dataclass(frozen=True)
class CloseFds:
    fds: tuple[int, ...]


@dataclass(frozen=True)
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


# The I/O loop


class _Out:
    """A non-blocking socket's queue of writes; fds go with the first byte of theirs."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queue: deque[list[Any]] = deque()  # [data, fds, owned]

    def push(self, data: bytes, fds: tuple[int, ...] = (), owned: bool = True) -> None:
        self.queue.append([data, fds, owned])

    def flush(self) -> None:
        """Write what the socket takes now. OSError: the peer is gone."""
        while self.queue:
            item = self.queue[0]
            data, fds, owned = item
            try:
                n = send_with_fds(self.sock, data, fds)
            except BlockingIOError:
                return
            if fds:
                if owned:
                    _close_all(fds)
                item[1] = ()
            if n < len(data):
                item[0] = data[n:]
                return
            self.queue.popleft()

    def drop(self) -> None:
        for _data, fds, owned in self.queue:
            if owned:
                _close_all(fds)
        self.queue.clear()


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def log(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"{PROG}[{os.getpid()}]: {text}\n")
        sys.stderr.flush()


class _Link:
    """One libvirt connection and the QEMU connection made for it."""

    def __init__(self, client: socket.socket, server: socket.socket, session: Session) -> None:
        self.client, self.server, self.session = client, server, session
        self.to_client, self.to_server = _Out(client), _Out(server)
        self.asked: dict[int, float] = {}  # token -> deadline
        self.cancels: dict[int, threading.Event] = {}  # token -> set when given up on


@dataclass
class Proxy:
    """Accepts libvirt on its listening socket; for each connection, a fresh QEMU one."""

    listener: socket.socket
    qemu_path: str
    qemu_pidfd: int | None
    decide: Decide
    domain: str | None = None
    timeout: float = DECISION_TIMEOUT

    def __post_init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.results: queue.SimpleQueue[tuple[_Link, int, str | None, float]] = \
            queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.link: _Link | None = None

    def run(self) -> None:
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        if self.qemu_pidfd is not None:
            self.sel.register(self.qemu_pidfd, selectors.EVENT_READ, "exit")
        while True:
            for key, mask in self.sel.select(self._wait()):
                what = key.data
                if what == "exit":
                    self._qemu_exited()
                    return
                if what == "accept":
                    self._accept()
                elif what == "wake":
                    self._results()
                elif self.link is not None:
                    self._io(self.link, what, mask)
            self._expire()

    def _wait(self) -> float | None:
        if self.link is None or not self.link.asked:
            return None
        return max(0.0, min(self.link.asked.values()) - time.monotonic())

    def _accept(self) -> None:
        if self.link is not None:
            return
        try:
            client, _addr = self.listener.accept()
        except BlockingIOError:
            return
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.connect(self.qemu_path)
        except OSError as exc:
            log(f"cannot reach QEMU's monitor at {self.qemu_path}: {exc}")
            server.close()
            client.close()
            return
        client.setblocking(False)
        server.setblocking(False)
        link = _Link(client, server, Session(client.fileno(), self.domain))
        self.link = link
        self.sel.unregister(self.listener)
        self.sel.register(client, selectors.EVENT_READ, "client")
        self.sel.register(server, selectors.EVENT_READ, "server")

    def _io(self, link: _Link, what: str, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(link)
        if self.link is not link or not mask & selectors.EVENT_READ:
            return
        try:
            if what == "client":
                data, fds = recv_with_fds(link.client)
                if not data:
                    _close_all(fds)
                    self._close(link, "libvirt closed the monitor")
                    return
                self._apply(link, link.session.from_client(data, fds))
            else:
                data = link.server.recv(256 * 1024)
                if not data:
                    self._close(link, "QEMU closed the monitor")
                    return
                self._apply(link, link.session.from_server(data))
        except BlockingIOError:
            return
        except OSError as exc:
            self._close(link, f"monitor connection failed: {exc}")
            return
        self._flush(link)

    def _apply(self, link: _Link, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, ToServer):
                link.to_server.push(a.raw, a.fds, a.owned)
            elif isinstance(a, ToClient):
                link.to_client.push(a.raw)
            elif isinstance(a, CloseFds):
                _close_all(a.fds)
            elif isinstance(a, Log):
                log(a.text)
            else:
                link.asked[a.token] = time.monotonic() + self.timeout
                cancel = link.cancels[a.token] = threading.Event()
                threading.Thread(
                    target=self._decide, args=(link, a.token, a.request, cancel), daemon=True
                ).start()

    def _decide(self, link: _Link, token: int, request: UsbHostRequest,
                cancel: threading.Event) -> None:
        refusal: str | None = None
        started = time.monotonic()
        try:
            self.decide(request, cancel)
        except SafeUSBError as exc:
            refusal = str(exc) or type(exc).__name__
        except Exception as exc:
            refusal = f"the decision failed ({type(exc).__name__}: {exc})"
        self.results.put((link, token, refusal, time.monotonic() - started))
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")

    def _results(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 4096)
        while True:
            try:
                link, token, refusal, seconds = self.results.get_nowait()
            except queue.Empty:
                return
            cancel = link.cancels.pop(token, None)
            link.asked.pop(token, None)
            if link is self.link and cancel is not None:
                if cancel.is_set() and refusal is not None:
                    refusal = f"no decision within {self.timeout:g} s; {refusal}"
                self._apply(link, link.session.decided(token, refusal, seconds))
                self._flush(link)

    def _expire(self) -> None:
        """A decision past its deadline is cancelled, and answered once it has stopped and
        put the host back as it was (a refusal while the work goes on would leave it
        changed)."""
        link = self.link
        if link is None:
            return
        now = time.monotonic()
        for token, deadline in list(link.asked.items()):
            if deadline <= now:
                del link.asked[token]
                log(f"no decision within {self.timeout:g} s: cancelling it; the answer "
                    "waits until the host is as it was")
                link.cancels[token].set()

    def _flush(self, link: _Link) -> None:
        if self.link is not link:
            return
        try:
            link.to_server.flush()
            link.to_client.flush()
        except OSError as exc:
            self._close(link, f"monitor connection failed: {exc}")
            return
        for sock, out, what in ((link.client, link.to_client, "client"),
                                (link.server, link.to_server, "server")):
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if out.queue else 0)
            self.sel.modify(sock, events, what)

    def _close(self, link: _Link, why: str) -> None:
        if self.link is not link:
            return
        log(why)
        self.link = None
        for cancel in link.cancels.values():
            cancel.set()  # nobody waits for these answers: undo whatever they did
        for sock in (link.client, link.server):
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
        with contextlib.suppress(OSError):
            link.client.setblocking(True)
            link.client.settimeout(1.0)
            link.to_client.flush()
        link.to_client.drop()
        link.to_server.drop()
        _close_all(link.session.abandon())
        link.client.close()
        link.server.close()
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")

    def _qemu_exited(self) -> None:
        link = self.link
        if link is not None:
            with contextlib.suppress(OSError):
                link.server.setblocking(True)
                link.server.settimeout(1.0)
                while data := link.server.recv(256 * 1024):
                    self._apply(link, link.session.from_server(data))
            self._close(link, "QEMU exited")


def run_proxy(
    listener: socket.socket,
    qemu_path: str,
    qemu_pidfd: int | None,
    decide: Decide,
    domain: str | None,
    timeout: float = DECISION_TIMEOUT,
) -> None:
    Proxy(listener, qemu_path, qemu_pidfd, decide, domain, timeout).run()


# The executable


@dataclass(frozen=True)
class GateArgs:
    real_emulator: str
    qemu_args: tuple[str, ...]
    decision: str | None = None
    timeout: float = DECISION_TIMEOUT
    daemon_socket: str | None = None  # safeusbd's socket; None: its standard place


def launcher_path(real_emulator: str, root: str = GATE_ROOT) -> str:
    """Where the gate's launcher for a real emulator lives: GATE_ROOT + its path."""
    if not os.path.isabs(real_emulator) or os.path.normpath(real_emulator) != real_emulator:
        raise UsageError(f"emulator path must be absolute and normal: {real_emulator!r}")
    if is_gate_path(real_emulator, root):
        raise UsageError(f"{real_emulator} is a gate already")
    return root + real_emulator


def is_gate_path(path: str, root: str = GATE_ROOT) -> bool:
    return path == root or path.startswith(root + "/")


def parse_gate_argv(argv: Sequence[str], root: str = GATE_ROOT) -> GateArgs:
    """`GATE_ROOT/usr/bin/qemu-system-x86_64 QEMU-ARGS...` (how libvirt runs it), or
    `safeusb-qemu-gate --real-emulator PATH [--decision MODULE:FUNCTION]
    [--decision-timeout SECONDS] [--daemon-socket PATH] -- QEMU-ARGS...` (for tests)."""
    prog = argv[0] if argv else PROG
    if is_gate_path(prog, root):
        real = prog[len(root):]
        if not real.startswith("/") or os.path.normpath(real) != real or is_gate_path(real, root):
            raise UsageError(f"{prog}: names no real emulator below {root}")
        return GateArgs(real, tuple(argv[1:]))
    real_emulator: str | None = None
    decision: str | None = None
    daemon_socket: str | None = None
    timeout = DECISION_TIMEOUT
    rest = list(argv[1:])
    while rest and rest[0] != "--":
        opt = rest.pop(0)
        if opt in ("--real-emulator", "--decision", "--decision-timeout",
                   "--daemon-socket") and rest:
            value = rest.pop(0)
            if opt == "--real-emulator":
                real_emulator = value
            elif opt == "--decision":
                decision = value
            elif opt == "--daemon-socket":
                if not os.path.isabs(value):
                    raise UsageError(f"{PROG}: --daemon-socket must be an absolute path")
                daemon_socket = value
            else:
                try:
                    timeout = float(value)
                except ValueError:
                    timeout = math.nan
                if not math.isfinite(timeout) or timeout <= 0:
                    raise UsageError(f"{PROG}: --decision-timeout {value!r}: give a positive "
                                     "number of seconds")
        else:
            raise UsageError(f"{PROG}: unknown argument {opt!r}; usage: {PROG} "
                             "--real-emulator PATH [--decision MODULE:FUNCTION] "
                             "[--decision-timeout SECONDS] [--daemon-socket PATH] "
                             "-- QEMU-ARGS")
    if real_emulator is None:
        raise UsageError(f"{PROG}: --real-emulator PATH is required when not run as "
                         f"{root}/<emulator path>")
    if not os.path.isabs(real_emulator) or is_gate_path(real_emulator, root):
        raise UsageError(f"{PROG}: --real-emulator must be an absolute path outside {root}")
    return GateArgs(real_emulator, tuple(rest[1:]), decision, timeout, daemon_socket)


def load_decision(spec: str | None, daemon_socket: str | None = None) -> Decide:
    """The decision: by default, asking safeusbd (at daemon_socket, else its standard
    place) to prepare the device; MODULE:FUNCTION in tests."""
    if spec is None:
        from safeusb.safeusbd import client  # noqa: F401, PLC0415 (now: the first decision pays no import)

        return functools.partial(prepare_decision, socket_path=daemon_socket)
    module, sep, func = spec.partition(":")
    if not sep or not module or not func:
        raise UsageError(f"--decision {spec!r}: give MODULE:FUNCTION")
    import importlib  # noqa: PLC0415

    fn = getattr(importlib.import_module(module), func)
    if not callable(fn):
        raise UsageError(f"--decision {spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


def start_guarded(ga: GateArgs, mon: MonitorSocket, decide: Decide) -> int:
    """Proxy in a detached grandchild; then this process becomes QEMU."""
    # Named, not probed: tempfile's search writes test files that QEMU's confinement
    # (AppArmor's libvirt-qemu abstraction and safeusb's rules) does not allow.
    tmp = os.environ.get("TMPDIR", "")
    private = tempfile.mkdtemp(prefix="safeusb-gate-",
                               dir=tmp if os.path.isabs(tmp) and os.path.isdir(tmp) else "/tmp")  # noqa: S108
    qemu_path = os.path.join(private, "monitor.sock")
    qemu_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu_listener.bind(qemu_path)
    qemu_listener.listen(1)
    if mon.fd is not None:
        client_fd = mon.fd
    else:
        assert mon.path is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(mon.path)
        libvirt_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        libvirt_listener.bind(mon.path)
        libvirt_listener.listen(1)
        client_fd = libvirt_listener.detach()
        os.set_inheritable(client_fd, True)
    args = with_monitor_fd(ga.qemu_args, mon, qemu_listener.fileno())
    qemu_listener.set_inheritable(True)
    pidfd = os.pidfd_open(os.getpid())
    domain = domain_name(ga.qemu_args)
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            qemu_listener.close()
            log(f"guards the QMP monitor of {domain or 'a domain'}")
            listener = socket.socket(fileno=os.dup(client_fd))
            run_proxy(listener, qemu_path, pidfd, decide, domain, ga.timeout)
            code = 0
        except BaseException:
            log("proxy failed:\n" + traceback.format_exc())
        finally:
            shutil.rmtree(private, ignore_errors=True)
            os._exit(code)
    os.waitpid(child, 0)
    os.close(pidfd)
    try:
        os.execv(ga.real_emulator, [ga.real_emulator, *args])  # noqa: S606 (argument list)
    except OSError as exc:
        log(f"cannot run {ga.real_emulator}: {exc}")
    return EXIT_IN_USE


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        ga = parse_gate_argv(argv)
        mon = find_monitor(ga.qemu_args)
        if mon is None:
            os.execv(ga.real_emulator, [ga.real_emulator, *ga.qemu_args])  # noqa: S606
        decide = load_decision(ga.decision, ga.daemon_socket)
    except MonitorArgsError as exc:
        log(f"refusing to start QEMU: {exc}")
        return EXIT_IN_USE
    except SafeUSBError as exc:
        log(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        log(f"cannot run the emulator: {exc}")
        return EXIT_IN_USE
    return start_guarded(ga, mon, decide)


if __name__ == "__main__":
    sys.exit(main())
