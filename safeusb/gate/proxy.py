"""The gate's I/O: accepts libvirt on the monitor socket, opens a QEMU connection for each,
and carries out what the session (gate.session) decides, fds included."""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from safeusb.errors import SafeUSBError
from safeusb.gate.qemu_usb_host import (
    Decide,
    UsbHostRequest,
)
from safeusb.gate.qmp import (
    recv_with_fds,
    send_with_fds,
)
from safeusb.gate.session import (
    DECISION_TIMEOUT,
    Action,
    CloseFds,
    Log,
    Session,
    ToClient,
    ToServer,
)

PROG = "safeusb-qemu-gate"

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


def say(text: str) -> None:
    """A line on the gate's stderr (libvirt keeps it in the domain's log)."""
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
            say(f"cannot reach QEMU's monitor at {self.qemu_path}: {exc}")
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
                say(a.text)
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
                say(f"no decision within {self.timeout:g} s: cancelling it; the answer "
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
        say(why)
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

