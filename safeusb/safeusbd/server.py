"""safeusbd: the one privileged decision service (docs/safeusbd.md).

A root service on a UNIX stream socket, started by systemd socket activation or on its
own. Each connection is served by its own thread, at most ``max_connections`` at once;
every request line must arrive within ``request_timeout`` seconds, so a slow or silent
client holds only its own thread; a user other than root may hold ``per_uid`` connections,
and ``root_reserve`` of them are kept for root. The peer is identified once, on accept,
by SO_PEERCRED and a pidfd; what it may ask follows from that alone (safeusb/safeusbd/peer.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from safeusb.errors import AmbiguousSelector, NoSuchDevice, SafeUSBError, SelectorError
from safeusb.host import defaults
from safeusb.host.procfs import CLOCK_TICKS, pidfd_pid, process_start_ticks, read_cgroup
from safeusb.host.roots import PROC, Roots
from safeusb.safeusbd import protocol as proto
from safeusb.safeusbd.peer import Caller, DomainResolver, LibvirtResolver, Peer, classify, refusal
from safeusb.safeusbd.protocol import DeviceArgs, ProtocolError, Request
from safeusb.values import frozen

if TYPE_CHECKING:
    from safeusb.host.guard import Refusal
    from safeusb.host.model import Target

log = logging.getLogger("safeusb")

DEFAULT_SOCKET = defaults.SOCKET
DEFAULT_POLICY = defaults.POLICY
DEFAULT_STATE_DIR = defaults.STATE_DIR
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5 and later
SD_LISTEN_FDS_START = 3


# --- who is on the other end -------------------------------------------------------------

def peer_credentials(conn: socket.socket) -> Peer:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def peer_pidfd(conn: socket.socket, pid: int) -> int:
    """A pidfd for the peer: the kernel's own (SO_PEERPIDFD, exactly the process that
    connected) where it has one, else one opened for its pid at once."""
    try:
        return conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise
    return os.pidfd_open(pid)


def identify(conn: socket.socket, resolve: DomainResolver, proc: str = PROC) -> Caller:
    """The caller on a connection just accepted. A peer whose pid was reused meanwhile
    (it exited before its identity was read) is nobody: ValueError."""
    peer = peer_credentials(conn)
    pidfd = peer_pidfd(conn, peer.pid)
    try:
        caller = classify(peer, read_cgroup(peer.pid, proc), resolve)
        if pidfd_pid(pidfd, proc) != peer.pid:
            raise ValueError(f"peer pid {peer.pid} exited while it was being identified")
        return caller
    finally:
        os.close(pidfd)


Identify = Callable[[socket.socket], Caller]


# --- what the daemon does -----------------------------------------------------------------

@frozen
class Done:
    """What prepare or release did: ok, the outcome (handover.Outcome.as_json), and when not
    ok, the error kind (refused or failed) and why."""

    ok: bool
    outcome: dict[str, Any]
    kind: str = ""
    message: str = ""


class DeviceActions(Protocol):
    """The work behind the ops: the host's by default, a fake in unit tests."""

    def inspect(self, args: DeviceArgs, caller_pid: int | None = None) -> dict[str, Any]: ...

    def prepare(self, args: DeviceArgs, cancel: threading.Event,
                after_refusal: bool = False, requester: int | None = None) -> Done: ...

    def release(self, args: DeviceArgs, only_domain: str | None) -> Done: ...


HUB_CLASS = 0x09  # USB hubs: nothing of theirs is handed over


def usb_at(roots: Roots, bus: int, addr: int) -> Target:
    """The USB device at a bus and address, read once and kept while no uevent comes (a
    device plugged, unplugged, bound or unbound is one: Roots.read_quietly)."""
    from safeusb.host.selector import Selector, resolve  # noqa: PLC0415

    selector = Selector(f"{bus:03d}:{addr:03d}", bus=bus, device=addr)
    return roots.read_quietly(("usb", bus, addr), lambda: resolve(selector, roots))[0]


def keep_devices(roots: Roots) -> None:
    """Read ahead of any request what a decision reads of each USB device's tree (the
    device, its walk, the block devices; hubs aside), kept until the next uevent: run once
    the uevents settle (safeusb.safeusbd.events.EventLoop)."""
    from safeusb.host import sysfs  # noqa: PLC0415
    from safeusb.host.snapshot import keep_device  # noqa: PLC0415

    for name in sysfs.usb_port_names(roots):
        found = sysfs.usb_device_address(roots, name)
        if found is None:
            continue
        try:
            target = usb_at(roots, *found)
        except SafeUSBError:
            continue  # gone meanwhile
        if target.usb is not None and target.usb.device_class != HUB_CLASS:
            keep_device(roots, target)


class HostActions:
    """Prepare, release (service.Handover) and inspect on this host, with the daemon's
    policy and state."""

    def __init__(self, roots: Roots, policy_path: str, state_dir: str) -> None:
        self.roots = roots
        self.policy_path = policy_path
        self.state_dir = state_dir

    def _target(self, args: DeviceArgs) -> Any:
        from safeusb.host.selector import Selector, resolve  # noqa: PLC0415

        if args.selector is not None:
            target = resolve(Selector.from_string(args.selector), self.roots)
        else:  # the gate's and the kernel guard's question
            assert args.bus is not None and args.addr is not None
            target = usb_at(self.roots, args.bus, args.addr)
        if args.bus is not None:
            usb = target.usb
            if usb is None or (usb.busnum, usb.devnum) != (args.bus, args.addr):
                now = f"bus {usb.busnum} device {usb.devnum}" if usb else "not a USB device"
                raise NoSuchDevice(args.describe(), f"the selector names {now}")
        return target

    def inspect(self, args: DeviceArgs, caller_pid: int | None = None) -> dict[str, Any]:
        """What `safeusb inspect --json` prints; the asking process is left out, as the
        command leaves itself out."""
        from safeusb.host.runner import Runner  # noqa: PLC0415
        from safeusb.host.snapshot import read_snapshot  # noqa: PLC0415
        from safeusb.inspect.decide import inspect  # noqa: PLC0415
        from safeusb.inspect.report import as_json  # noqa: PLC0415

        skip = frozenset() if caller_pid is None else frozenset({caller_pid})
        target = self._target(args)
        Runner.for_roots(self.roots).ensure_debugfs(self.roots)
        return as_json(inspect(read_snapshot(self.roots, target, skip_pids=skip)))

    def _handover(self) -> Any:
        from safeusb.handover.service import Handover  # noqa: PLC0415

        return Handover.from_paths(self.roots, self.policy_path, self.state_dir)

    def prepare(self, args: DeviceArgs, cancel: threading.Event,
                after_refusal: bool = False, requester: int | None = None) -> Done:
        """after_refusal, requester: prepared because the kernel guard refused a program
        the device, and that program while it still runs (see handover.prepare)."""
        target = self._target(args)
        outcome = self._handover().prepare(target, args.domain, timeout=args.timeout,
                                           cancel=cancel, after_refusal=after_refusal,
                                           requester=requester)
        if outcome.ok:
            return Done(True, outcome.as_json())
        refused = outcome.plan is not None and outcome.plan.refused
        return Done(False, outcome.as_json(), proto.REFUSED if refused else proto.FAILED,
                    "; ".join(outcome.why_not()))

    def release(self, args: DeviceArgs, only_domain: str | None) -> Done:
        from safeusb.handover.transaction import target_key  # noqa: PLC0415

        handover = self._handover()
        policy = handover.policy_for_release(log.warning)
        if not args.names_device():
            assert args.domain is not None
            outcome = handover.release_domain(args.domain, policy)
        else:
            target = self._target(args)
            key = target_key(target)
            if only_domain is not None:
                record = handover.state.load(key)
                if record is not None and record.domain != only_domain:
                    raise NotPermitted(f"{key} is not recorded as taken for domain "
                                       f"{only_domain}")
            outcome = handover.release_target(target, args.domain, policy)
        if outcome.ok:
            return Done(True, outcome.as_json())
        return Done(False, outcome.as_json(), proto.FAILED,
                    "not all given back: " + "; ".join(outcome.not_undone))


class NotPermitted(SafeUSBError):
    exit_code = 1


def error_kind(exc: BaseException) -> str:
    """The protocol's error kind for an exception raised while serving a request."""
    from safeusb.handover.policy import PolicyError  # noqa: PLC0415
    from safeusb.host.journal import DeviceBusy, StateError  # noqa: PLC0415

    kinds: tuple[tuple[type[BaseException], str], ...] = (
        (ProtocolError, proto.BAD_REQUEST), (NotPermitted, proto.NOT_PERMITTED),
        (NoSuchDevice, proto.NO_SUCH_DEVICE), (AmbiguousSelector, proto.BAD_SELECTOR),
        (SelectorError, proto.BAD_SELECTOR), (DeviceBusy, proto.BUSY),
        (PolicyError, proto.POLICY), (StateError, proto.STATE),
        (SafeUSBError, proto.FAILED),
    )
    for cls, kind in kinds:
        if isinstance(exc, cls):
            return exc.kind if isinstance(exc, ProtocolError) else kind
    return proto.INTERNAL


# --- the server ---------------------------------------------------------------------------

@dataclass
class Limits:
    max_connections: int = 32
    per_uid: int = 4  # connections one non-root user may hold at once
    root_reserve: int = 8  # of max_connections, kept for root
    request_timeout: float = 30.0  # a whole request line, and sending a reply
    idle_exit: float | None = None  # exit after this long without a connection


class _Timeout(Exception):
    pass


class _LineTooLong(Exception):
    pass


class _Connection:
    def __init__(self, conn: socket.socket, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout
        self.buffer = b""

    def read_line(self) -> bytes | None:
        """The next line (without newline), None at the end; _Timeout when a line takes
        longer than the timeout, _LineTooLong past the limit."""
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.buffer:
            if len(self.buffer) >= proto.MAX_REQUEST_LINE:
                raise _LineTooLong
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout
            self.conn.settimeout(left)
            try:
                chunk = self.conn.recv(proto.MAX_REQUEST_LINE)
            except TimeoutError:
                raise _Timeout from None
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        if len(line) + 1 > proto.MAX_REQUEST_LINE:
            raise _LineTooLong
        return line

    def finish(self, data: bytes) -> None:
        """Send a last reply and close gently: unread input would make the close a reset,
        which can destroy the reply before the client reads it. What the client still
        sends is read and dropped, for a second and 1 MiB at most."""
        if not self.send(data):
            return
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 1.0
            for _ in range(64):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.conn.settimeout(left)
                if not self.conn.recv(16384):
                    break

    def send(self, data: bytes) -> bool:
        self.conn.settimeout(self.timeout)
        try:
            self.conn.sendall(data)
        except OSError:
            return False
        return True


@dataclass
class Daemon:
    listener: socket.socket
    identify: Identify
    actions: DeviceActions
    limits: Limits = field(default_factory=Limits)
    others_may_inspect: bool = True
    # Something to follow besides connections (devices handed over, new domains to
    # protect): then the daemon does not exit when idle.
    keep_alive: Callable[[], bool] = lambda: False
    on_done: Callable[[str], None] = lambda _op: None  # a prepare or release finished
    stay: Callable[[], bool] = lambda: False  # no idle exit while this says so (the guard)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _active: int = 0
    _threads: set[threading.Thread] = field(default_factory=set)
    _cancels: set[threading.Event] = field(default_factory=set)
    _conns: set[socket.socket] = field(default_factory=set)
    _by_uid: dict[int, int] = field(default_factory=dict)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _turning_away: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(32))
    _wake: tuple[int, int] = field(default_factory=lambda: os.pipe2(os.O_NONBLOCK |
                                                                   os.O_CLOEXEC))

    def stop(self) -> None:
        """Stop accepting; cancel what is running (prepare undoes its steps) and let each
        connection answer and close."""
        self._stopping.set()
        with self._lock:
            for cancel in self._cancels:
                cancel.set()
            for conn in self._conns:  # a connection waiting for a request ends now
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)
        with contextlib.suppress(OSError):
            os.write(self._wake[1], b"x")

    def serve_forever(self) -> None:
        last_seen = time.monotonic()
        try:
            while not self._stopping.is_set():
                wait = None
                if self.limits.idle_exit is not None:
                    with self._lock:
                        busy = self._active > 0
                    busy = busy or self.stay()
                    if busy:
                        last_seen = time.monotonic()
                    wait = max(0.0, last_seen + self.limits.idle_exit - time.monotonic())
                    if not busy and wait == 0:
                        if self._keep_alive():
                            last_seen = time.monotonic()
                            continue
                        log.info("safeusbd: idle for %g s; exiting", self.limits.idle_exit)
                        break
                    wait = min(wait, 1.0) if busy else wait
                listening = self.listener.fileno()
                ready, _, _ = select.select([listening, self._wake[0]], [], [], wait)
                if self._wake[0] in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake[0], 4096)
                if listening in ready:
                    last_seen = time.monotonic()
                    try:
                        self._accept()
                    except Exception:  # one connection's trouble never ends the daemon
                        log.exception("safeusbd: internal error accepting a connection")
        finally:
            self.listener.close()
            for thread in list(self._threads):
                thread.join()
            os.close(self._wake[0])
            os.close(self._wake[1])

    def _keep_alive(self) -> bool:
        try:
            return self.keep_alive()
        except Exception:  # when in doubt, stay
            log.exception("safeusbd: internal error deciding whether to stay")
            return True

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # out of descriptors: drop this one, keep serving
            log.warning("safeusbd: accept failed: %s", exc)
            return
        try:
            uid = peer_credentials(conn).uid
        except OSError:
            conn.close()
            return
        with self._lock:
            others_full = self._by_uid.get(uid, 0) >= self.limits.per_uid or \
                self._active >= self.limits.max_connections - self.limits.root_reserve
            full = self._active >= self.limits.max_connections or (uid != 0 and others_full)
            if not full:
                self._active += 1
                self._by_uid[uid] = self._by_uid.get(uid, 0) + 1
        if full:
            self._turn_away(conn, uid)
            return
        thread = threading.Thread(target=self._serve, args=(conn, uid), daemon=True,
                                  name="safeusbd-conn")
        with self._lock:
            self._threads.add(thread)
            self._conns.add(conn)
        thread.start()

    def _turn_away(self, conn: socket.socket, uid: int) -> None:
        """Tell a connection past the limits so, from a short-lived thread of its own (at
        most 32 at a time; beyond that, just close)."""
        log.warning("safeusbd: connection limit reached (uid %d); refusing another", uid)
        reply = proto.error_reply(None, proto.OVERLOADED, "safeusbd is serving as many "
                                  "connections as it takes; try again shortly")
        if not self._turning_away.acquire(blocking=False):
            conn.close()
            return

        def tell() -> None:
            try:
                with conn:
                    _Connection(conn, 1.0).finish(reply)
            finally:
                self._turning_away.release()

        threading.Thread(target=tell, daemon=True, name="safeusbd-full").start()

    def _serve(self, conn: socket.socket, uid: int) -> None:
        try:
            with conn:
                self._serve_connection(_Connection(conn, self.limits.request_timeout))
        except Exception:  # one connection's trouble never ends the daemon
            log.exception("safeusbd: internal error on a connection")
        finally:
            with self._lock:
                self._active -= 1
                self._by_uid[uid] -= 1
                if not self._by_uid[uid]:
                    del self._by_uid[uid]
                self._threads.discard(threading.current_thread())
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"x")

    def _serve_connection(self, c: _Connection) -> None:
        began = time.monotonic()
        try:
            caller = self.identify(c.conn)
            identified = time.monotonic() - began
        except (OSError, ValueError) as exc:
            log.warning("safeusbd: caller not identified, refused: %s", exc)
            c.send(proto.error_reply(None, proto.NOT_PERMITTED,
                                     f"the caller cannot be identified: {exc}"))
            return
        while not self._stopping.is_set():
            try:
                line = c.read_line()
            except _Timeout:
                c.finish(proto.error_reply(None, proto.TIMEOUT, "no complete request within "
                                         f"{self.limits.request_timeout:g} s; closing"))
                return
            except _LineTooLong:
                log.warning("safeusbd: %s sent a line over %d bytes; closing",
                            caller.describe(), proto.MAX_REQUEST_LINE)
                c.finish(proto.error_reply(None, proto.BAD_REQUEST, "request line longer "
                                         f"than {proto.MAX_REQUEST_LINE} bytes; closing"))
                return
            except OSError:
                return
            if line is None:
                return
            if not c.send(self._answer(caller, line, c.conn, identified)):
                return

    def _answer(self, caller: Caller, line: bytes, conn: socket.socket,
                identified: float = 0.0) -> bytes:
        try:
            request = proto.parse_request(line)
        except ProtocolError as exc:
            log.warning("safeusbd: %s: bad request refused: %s", caller.describe(), exc)
            return proto.error_reply(exc.request_id, exc.kind, exc.message)
        if self._stopping.is_set():
            return proto.error_reply(request.id, proto.SHUTTING_DOWN, "safeusbd is stopping")
        why = refusal(caller, request.op, request.args.domain, self.others_may_inspect)
        if why is not None:
            log.warning("safeusbd: %s: %s %s refused: %s", caller.describe(), request.op,
                        request.args.describe(), why)
            return proto.error_reply(request.id, proto.NOT_PERMITTED, why)
        try:
            return self._carry_out(caller, request, conn, identified)
        except Exception as exc:
            kind = error_kind(exc)
            if kind == proto.INTERNAL:
                log.exception("safeusbd: %s: %s failed", caller.describe(), request.op)
                message = f"internal error: {exc.__class__.__name__}: {exc}"
            else:
                message = str(exc)
            if request.op in proto.ACTING_OPS or kind == proto.NOT_PERMITTED:
                log.warning("safeusbd: %s: %s %s: %s", caller.describe(), request.op,
                            request.args.describe(), message)
            return proto.error_reply(request.id, kind, message)

    def _carry_out(self, caller: Caller, request: Request, conn: socket.socket,
                   identified: float) -> bytes:
        """identified: how long telling the caller took (logged with the time taken)."""
        args, op = request.args, request.op
        if op == "ping":
            return proto.ok_reply(request.id, {"server": "safeusbd",
                                               "protocol": proto.VERSION,
                                               "caller": caller.as_json()})
        if op == "inspect":
            return proto.ok_reply(request.id, self.actions.inspect(args, caller.peer.pid))
        log.info("safeusbd: %s: %s %s%s", caller.describe(), op, args.describe(),
                 f" for domain {args.domain}" if args.domain and args.names_device() else "")
        started, cpu = time.monotonic(), time.thread_time()
        if op == "prepare":
            cancel = threading.Event()
            with self._lock:
                self._cancels.add(cancel)
            if self._stopping.is_set():
                cancel.set()
            try:
                with _cancel_on_hangup(conn, cancel):
                    done = self.actions.prepare(args, cancel)
            finally:
                with self._lock:
                    self._cancels.discard(cancel)
        else:
            done = self.actions.release(args, caller.domain if caller.role == "domain"
                                        else None)
        with contextlib.suppress(Exception):
            self.on_done(op)
        if not done.ok:
            log.warning("safeusbd: %s: %s %s: %s: %s", caller.describe(), op,
                        args.describe(), done.kind, done.message)
            return proto.error_reply(request.id, done.kind, done.message, done.outcome)
        log.info("safeusbd: %s: %s %s: done (%s) in %.0f ms (CPU %.0f ms; the caller "
                 "identified in %.0f ms)%s",
                 caller.describe(), op, args.describe(), done.outcome.get("host_state"),
                 (time.monotonic() - started) * 1000, (time.thread_time() - cpu) * 1000,
                 identified * 1000, _took(done.outcome))
        return proto.ok_reply(request.id, done.outcome)


def _took(outcome: dict[str, Any]) -> str:
    """Where the time went: reading the host and deciding, then each step done."""
    parts = []
    read = outcome.get("read_seconds")
    if isinstance(read, int | float):
        parts.append(f"read and decided {read * 1000:.0f} ms")
    parts.extend(f"{what} {seconds * 1000:.0f} ms" for what, seconds in
                 zip(outcome.get("done") or (), outcome.get("seconds") or (), strict=False))
    return ": " + "; ".join(parts) if parts else ""


@contextlib.contextmanager
def _cancel_on_hangup(conn: socket.socket, cancel: threading.Event) -> Any:
    """While an op runs, a caller that hangs up no longer waits for it: cancel it, so
    prepare stops and undoes what it did."""
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC)  # the op is over: the watch ends at once

    def watch() -> None:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLRDHUP)
        poller.register(wake_r, select.POLLIN)
        fds = {fd for fd, _ in poller.poll()}
        if conn.fileno() in fds and wake_r not in fds:
            cancel.set()

    thread = threading.Thread(target=watch, daemon=True, name="safeusbd-hangup")
    try:
        thread.start()
        yield
    finally:
        os.write(wake_w, b"x")
        if thread.ident is not None:
            thread.join()
        os.close(wake_r)
        os.close(wake_w)


# --- the listening socket -----------------------------------------------------------------

def activation_socket(environ: dict[str, str], pid: int) -> socket.socket | None:
    """The socket systemd passed (LISTEN_PID/LISTEN_FDS, fd 3), or None when not
    socket-activated. Anything but one listening UNIX stream socket is an error."""
    if environ.get("LISTEN_PID") != str(pid):
        return None
    count = environ.get("LISTEN_FDS", "")
    if count != "1":
        raise SafeUSBError(f"systemd passed LISTEN_FDS={count!r}; safeusbd takes exactly one "
                           "socket (safeusbd.socket)")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM \
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise SafeUSBError("the socket systemd passed is not a listening UNIX stream socket")
    os.set_inheritable(sock.fileno(), False)
    return sock


def bind_socket(path: str) -> socket.socket:
    """Listen at path (mode 0666: the daemon authenticates every caller). A socket left by
    a daemon that is gone is replaced; one that answers is not."""
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o711, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise SafeUSBError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        else:
            raise SafeUSBError(f"{path}: another safeusbd is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o111)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o666)  # noqa: S103 (anyone may connect; every caller is authenticated)
    sock.listen(64)
    return sock


def _warn_unreachable(path: str) -> None:
    """QEMU processes not running as root can connect only through directories others
    may search."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent != "/":
        try:
            mode = os.stat(parent).st_mode
        except OSError:
            return
        if not mode & stat.S_IXOTH:
            log.warning("safeusbd: %s cannot be searched by others; QEMU processes that do "
                        "not run as root cannot reach %s (give it mode 0711)", parent, path)
            return
        parent = os.path.dirname(parent)


# --- the kernel guard's refusals ---------------------------------------------------------

def _stop(daemon: Daemon, watcher: Any) -> None:
    watcher.stopping.set()
    daemon.stop()


def _guard_enabled() -> bool:
    from safeusb.host.guard import enabled  # noqa: PLC0415

    return enabled()


def refused_domain(pid: int, start_ns: int, resolve: DomainResolver,
                   proc: str = PROC) -> tuple[str | None, str]:
    """The libvirt domain whose QEMU the refused process is: its cgroup scope, confirmed
    by libvirt (LibvirtResolver: the running domain with the scope's ID, whose QEMU from
    libvirt's pid file is in that scope), never what the process says. The cgroup is read
    first and the process's start time checked after, so a pid reused meanwhile names no
    domain. Returns the name or None, and why."""
    from safeusb.safeusbd.peer import machine_scope  # noqa: PLC0415

    cgroup = read_cgroup(pid, proc)
    if cgroup is None:
        return None, f"pid {pid} has exited"
    if start_ns and process_start_ticks(pid, proc) != start_ns * CLOCK_TICKS // 10**9:
        return None, f"pid {pid} is no longer the process that was refused"
    scope = machine_scope(cgroup)
    if scope is None:
        return None, f"pid {pid} is in no libvirt QEMU domain's cgroup"
    return resolve(scope)


def still_refused(r: Refusal, proc: str = PROC) -> int | None:
    """The pid of the process the guard refused (a guard.Refusal), if that process still
    runs (its start time, which the kernel reported with the refusal, is checked: a pid
    reused meanwhile is another process), else None."""
    if not r.pid or not r.start_time:
        return None
    if process_start_ticks(r.pid, proc) != r.start_time * CLOCK_TICKS // 10**9:
        return None
    return r.pid


def prepare_on_refusal(actions: DeviceActions, port: str, domain: str | None,
                       r: Refusal, proc: str = PROC) -> tuple[bool, str]:
    """safeusbd's prepare of a device the kernel guard refused to the process of ``r``
    (a guard.Refusal): its record says so (after_refusal), and that process's hold on the
    device's usbfs node is left out while it is still the process refused. (done, what
    was done or why not)."""
    try:
        done = actions.prepare(DeviceArgs(selector=port, domain=domain), threading.Event(),
                               after_refusal=True, requester=still_refused(r, proc))
    except SafeUSBError as exc:
        return False, str(exc)
    if done.ok:
        steps = done.outcome.get("done") or []
        return True, "; ".join(steps) or "nothing to tear down"
    return False, done.message


def _guard_watcher(actions: DeviceActions, state_dir: str,
                   resolve: DomainResolver | None = None) -> Any:
    """Read the kernel guard's refusals (safeusb guard) whenever it is enabled: log each
    (with the libvirt domain of a refused QEMU), and prepare an idle device by the policy
    so that the next attempt passes."""
    from safeusb.host import guard  # noqa: PLC0415
    from safeusb.host.journal import StateDir  # noqa: PLC0415

    refusals = guard.RefusalLog(state_dir)
    state = StateDir(state_dir)

    def domain_of(r: guard.Refusal) -> str | None:
        if resolve is None:
            return None
        name, why = refused_domain(r.pid, r.start_time, resolve)
        log.debug("guard: pid %d: %s", r.pid, why)
        return name

    def taken(port: str) -> bool:
        try:
            return state.load(port) is not None
        except SafeUSBError:
            return True  # a record that cannot be trusted: leave the device alone

    def repeats_told() -> None:
        for line in refusals.due():
            log.warning("guard: %s", line)

    watcher = guard.GuardWatcher(
        handle=lambda r: guard.handle_refusal(
            r, lambda port, domain: prepare_on_refusal(actions, port, domain, r),
            refusals, taken, domain_of=domain_of),
        state_dir=state_dir, tick=repeats_told)
    watcher.start()
    return watcher


# --- the command --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from safeusb.handover.policy import check_timeout  # noqa: PLC0415

    def seconds(text: str) -> float:
        try:
            return check_timeout(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def count(text: str) -> int:
        if not text.isdigit() or not 1 <= int(text) <= 1024:
            raise argparse.ArgumentTypeError(f"must be 1 to 1024, not {text!r}")
        return int(text)

    p = argparse.ArgumentParser(prog="safeusbd", description="The safeusb decision service: "
                                "prepare, release and inspect USB devices for callers it "
                                "authenticates (docs/safeusbd.md).")
    p.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"listen here when not socket-activated (default {DEFAULT_SOCKET})")
    p.add_argument("--policy", default=DEFAULT_POLICY, metavar="FILE",
                   help=f"policy file (default {DEFAULT_POLICY})")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=argparse.SUPPRESS)
    p.add_argument("--max-connections", type=count, default=32, metavar="N")
    p.add_argument("--request-timeout", type=seconds, default=30.0, metavar="SECONDS",
                   help="a request line must arrive within this (default 30)")
    p.add_argument("--idle-exit", type=seconds, metavar="SECONDS",
                   help="exit after this long without connections (default: 300 when "
                   "socket-activated, never otherwise)")
    p.add_argument("--others", choices=("inspect", "ping"), default="inspect",
                   help="what callers that are neither root nor a domain's QEMU may ask "
                   "(default inspect)")
    p.add_argument("--libvirt-uri", default="qemu:///system", metavar="URI",
                   help="libvirt to confirm domains with, and to follow domain events of")
    p.add_argument("--no-events", action="store_true",
                   help="follow neither uevents (devices handed over are then given back "
                   "only by `safeusb release` or the hook) nor libvirt's domain events")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def protect_new_domains(policy_path: str) -> bool:
    """The policy's [service] protect_new_domains, read now (PolicyError when the file
    cannot be used)."""
    from safeusb.handover.policy import Policy  # noqa: PLC0415

    return Policy.from_file(policy_path).protect_new_domains


def start_following(daemon: Daemon, args: argparse.Namespace,
                    roots: Roots) -> list[Callable[[], None]]:
    """Follow uevents (devices handed over coming back or leaving: safeusb.safeusbd.events) and
    libvirt's domain events (new domains, stopped ones: safeusb.safeusbd.domains); the daemon then
    stays up while there is something to follow. ``roots``: the requests' own, so that what
    they keep between reads serves both. Returns how to stop each."""
    from safeusb.handover.policy import Policy  # noqa: PLC0415
    from safeusb.host.journal import StateDir  # noqa: PLC0415
    from safeusb.protect import change_on  # noqa: PLC0415
    from safeusb.safeusbd import events  # noqa: PLC0415
    from safeusb.safeusbd.autoattach import AutoAttach, HostHandover, HostLibvirt  # noqa: PLC0415
    from safeusb.safeusbd.domains import DomainWatch, domain_active  # noqa: PLC0415

    stops: list[Callable[[], None]] = []
    state = StateDir(args.state_dir)
    def has_record(key: str) -> bool:
        """A record for the device; one that cannot be trusted counts (fail closed: the
        device is then left alone, and the log says why)."""
        try:
            return state.load(key) is not None
        except (SafeUSBError, OSError) as exc:
            log.warning("safeusbd: attach_to: %s: its record cannot be read (%s); left "
                        "alone", key, exc)
            return True

    attach = AutoAttach(roots, lambda: Policy.from_file(args.policy),
                        HostLibvirt(args.libvirt_uri),
                        HostHandover(roots, args.policy, args.state_dir),
                        has_record=has_record)
    _check_udev_rules(args.policy)
    started = events.start(roots, args.state_dir, args.policy,
                           domain_active=domain_active(args.libvirt_uri), attach=attach,
                           keep=lambda: keep_devices(roots))
    watch = loop = None
    if started is not None:
        watch, loop = started
        stops.append(loop.stop)
        daemon.on_done = loop.poke

    def stopped(name: str) -> None:
        if watch is not None and loop is not None:
            watch.domain_stopped(name)
            loop.poke(f"domain {name} stopped")

    def protect_new() -> bool:
        return protect_new_domains(args.policy)

    def domain_started(name: str) -> None:
        if loop is not None:
            attach.domain_started(name)
            loop.poke(f"domain {name} started")

    domains = DomainWatch(args.libvirt_uri, protect_new,
                          lambda conn, dom: change_on(conn, dom, True), stopped,
                          started=domain_started)
    domains.start()
    stops.append(domains.stop)

    def keep_alive() -> bool:
        if watch is not None and watch.watching():
            return True
        try:
            policy = Policy.from_file(args.policy)
        except SafeUSBError:
            return False
        return policy.protect_new_domains or bool(policy.attach_rules)

    daemon.keep_alive = keep_alive
    return stops


def _check_udev_rules(policy_path: str) -> None:
    """Say so when the installed udev rules do not match the policy's attach_to rules:
    the host might then take such a device before safeusbd hands it over."""
    from safeusb import udevrules  # noqa: PLC0415
    from safeusb.handover.policy import Policy  # noqa: PLC0415

    try:
        policy = Policy.from_file(policy_path)
    except SafeUSBError:
        return
    state = udevrules.installed_state(policy)
    if state not in ("up to date", "not needed"):
        log.warning("safeusbd: udev rules %s %s for the policy's attach_to rules: the host "
                    "may mount such devices before they are handed over; run `safeusb "
                    "install-udev-rules`", udevrules.rules_path(), state)


def main(argv: Sequence[str] | None = None) -> int:
    from safeusb.host.logsetup import setup_logging  # noqa: PLC0415

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO, True, tag="safeusbd")
    if os.geteuid() != 0:
        log.warning("safeusbd: not running as root; prepare and release will fail")
    try:
        listener = activation_socket(dict(os.environ), os.getpid())
        idle = args.idle_exit
        if listener is not None:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)
            idle = 300.0 if idle is None else idle
            where = "socket passed by systemd"
        else:
            listener = bind_socket(args.socket)
            where = args.socket
            _warn_unreachable(args.socket)
    except (SafeUSBError, OSError) as exc:
        print(f"safeusbd: {exc}", file=sys.stderr)
        return 1
    resolver = LibvirtResolver(uri=args.libvirt_uri)
    actions = HostActions(Roots.host(), args.policy, args.state_dir)
    daemon = Daemon(
        listener=listener,
        identify=lambda conn: identify(conn, resolver),
        actions=actions,
        limits=Limits(max_connections=args.max_connections,
                      request_timeout=args.request_timeout, idle_exit=idle),
        others_may_inspect=args.others == "inspect",
        stay=_guard_enabled,
    )
    followers = None if args.no_events else start_following(daemon, args, actions.roots)
    watcher = _guard_watcher(daemon.actions, args.state_dir, resolver)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: _stop(daemon, watcher))
    _preload(actions.roots)
    log.info("safeusbd: listening on %s (policy %s, state %s)", where, args.policy,
             args.state_dir)
    try:
        daemon.serve_forever()
    finally:
        for stop in followers or ():
            stop()
    if where == args.socket:  # a socket of its own: nobody answers there any more
        with contextlib.suppress(OSError):
            os.unlink(args.socket)
    log.info("safeusbd: stopped")
    return 0


def _preload(roots: Roots) -> None:
    """Import and read what requests use now, so that no decision pays for it (a
    waiting caller is queued by the kernel meanwhile)."""
    import importlib  # noqa: PLC0415

    for name in ("host.guard", "host.inputdev", "host.journal", "host.modeswitch",
                 "host.netinfo", "host.runner", "host.selector", "host.snapshot",
                 "inspect.decide", "inspect.report", "handover.plan", "handover.policy",
                 "handover.service", "handover.steps", "handover.transaction"):
        importlib.import_module(f"safeusb.{name}")  # a name that is not a module: a bug
    from safeusb.host import virt  # noqa: PLC0415

    virt.load()  # safeusbd runs without it (no libvirt events)
    from safeusb.host.modeswitch import switch_db  # noqa: PLC0415

    switch_db(roots)  # read the mode-switch database now; again only when it changes


if __name__ == "__main__":
    sys.exit(main())
