"""safeusbd follows libvirt: domain lifecycle events through libvirt-python's event loop.

- A domain **defined** anew (libvirt's DEFINED event, detail ADDED: `virsh define`,
  virt-manager, virt-install) is protected at once when the policy says
  ``[service] protect_new_domains = true`` (read at each event, so the setting takes
  effect without a restart). A definition that is only updated (UPDATED, which is also
  what `safeusb unprotect` causes) is left alone.
- A domain that **stopped** (STOPPED) is told to the handover watch: records of that
  domain never taken by its QEMU are given back (safeusb.safeusbd.events).
- A domain that **started** (STARTED) is told to safeusb.safeusbd.autoattach: devices the policy
  hands to it (attach_to) that wait on the host are attached.

The connection is read-write (protecting defines the domain again) and kept alive with
libvirt's keepalive; when libvirtd goes away (restart, stop) the close callback fires and
the connection is opened again every RETRY seconds until libvirtd answers, with the
events registered again.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from safeusb.host import virt

log = logging.getLogger("safeusb")

RETRY = 5.0  # seconds between attempts to reach libvirtd

class DomainWatch:
    """Lifecycle events of ``uri``'s domains, handed to a worker thread: ``protect(name)``
    for a new domain when ``protect_new()`` says so, ``stopped(name)`` for one that
    stopped."""

    def __init__(self, uri: str, protect_new: Callable[[], bool],
                 protect: Callable[[virt.Connection, virt.Domain], str],
                 stopped: Callable[[str], None], retry: float = RETRY,
                 started: Callable[[str], None] | None = None) -> None:
        self.uri = uri
        self.started = started
        self.protect_new = protect_new
        self.protect = protect
        self.stopped = stopped
        self.retry = retry
        self.jobs: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.conn: virt.Connection | None = None
        self.connected = threading.Event()
        self.protected: list[str] = []  # names protected by this watch, in order
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="safeusbd-domains")
        self._said_unreachable = False

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.jobs.put(("stop", ""))
        self.thread.join(timeout=30)

    # -- the worker --------------------------------------------------------------------

    def _run(self) -> None:
        virt.start_event_loop()
        while not self.stopping.is_set():
            if self.conn is None:
                self._connect()
            try:
                kind, name = self.jobs.get(timeout=self.retry if self.conn is None else 1.0)
            except queue.Empty:
                continue
            if kind == "closed":
                self._drop()
            elif kind == "defined":
                self._defined(name)
            elif kind == "stopped":
                self.stopped(name)
            elif kind == "started" and self.started is not None:
                self.started(name)
        self._drop()

    def _connect(self) -> None:
        try:
            conn = virt.Connection.open(self.uri)
        except virt.VirtError as exc:
            if not self._said_unreachable:
                log.warning("safeusbd: libvirt (%s) cannot be reached (%s); trying again "
                            "every %g s", self.uri, exc, self.retry)
                self._said_unreachable = True
            return
        try:
            conn.follow(self._on_lifecycle, self._on_close)
        except virt.VirtError as exc:
            log.warning("safeusbd: libvirt (%s): cannot follow domain events: %s", self.uri,
                        exc)
            conn.close()
            return
        self.conn = conn
        self._said_unreachable = False
        self.connected.set()
        log.info("safeusbd: following libvirt's domain events (%s)", self.uri)

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        self.connected.clear()
        if conn is None:
            return
        conn.close()
        if not self.stopping.is_set():
            log.warning("safeusbd: lost libvirt (%s); reconnecting", self.uri)

    def _defined(self, name: str) -> None:
        try:
            wanted = self.protect_new()
        except Exception as exc:  # a policy that cannot be read protects nothing new
            log.warning("safeusbd: domain %s defined; not protected: %s", name, exc)
            return
        if not wanted:
            return
        if self.conn is None:
            log.warning("safeusbd: domain %s defined; not protected: libvirt is gone", name)
            return
        try:
            line = self.protect(self.conn, self.conn.domain(name))
        except Exception as exc:
            log.warning("safeusbd: domain %s defined; NOT protected: %s", name, exc)
            return
        self.protected.append(name)
        log.info("safeusbd: domain %s defined; protected (protect_new_domains): %s", name,
                 line)

    # -- callbacks, in libvirt's event loop thread: hand over, never block ---------------

    def _on_close(self, reason: int) -> None:
        self.jobs.put(("closed", str(reason)))

    def _on_lifecycle(self, kind: str, name: str) -> None:
        self.jobs.put((kind, name))


def domain_active(uri: str) -> Callable[[str], bool | None]:
    """Whether libvirt runs the domain now: True, False (not running, or no such
    domain), None (libvirt cannot say)."""
    return lambda name: virt.domain_active(uri, name)
