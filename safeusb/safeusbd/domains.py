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
from typing import Any

log = logging.getLogger("safeusb")

RETRY = 5.0  # seconds between attempts to reach libvirtd
_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop(libvirt: Any) -> None:
    """libvirt's default event implementation, run by one thread for the whole process
    (registered before any connection that wants events is opened)."""
    global _loop_started  # noqa: PLW0603 (one event loop per process, as libvirt has)
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:  # the loop must keep running for every connection
                    log.exception("safeusbd: libvirt's event loop")

        # A timer wakes the loop now and then, so nothing waits on it for long.
        libvirt.virEventAddTimeout(1000, lambda _timer, _opaque: None, None)
        threading.Thread(target=run, daemon=True, name="safeusbd-libvirt-loop").start()
        _loop_started = True


class DomainWatch:
    """Lifecycle events of ``uri``'s domains, handed to a worker thread: ``protect(name)``
    for a new domain when ``protect_new()`` says so, ``stopped(name)`` for one that
    stopped."""

    def __init__(self, uri: str, protect_new: Callable[[], bool],
                 protect: Callable[[Any, Any, Any], str],
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
        self.conn: Any = None
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
        import libvirt  # noqa: PLC0415

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _ensure_event_loop(libvirt)
        while not self.stopping.is_set():
            if self.conn is None:
                self._connect(libvirt)
            try:
                kind, name = self.jobs.get(timeout=self.retry if self.conn is None else 1.0)
            except queue.Empty:
                continue
            if kind == "closed":
                self._drop(libvirt)
            elif kind == "defined":
                self._defined(libvirt, name)
            elif kind == "stopped":
                self.stopped(name)
            elif kind == "started" and self.started is not None:
                self.started(name)
        self._drop(libvirt)

    def _connect(self, libvirt: Any) -> None:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            if not self._said_unreachable:
                log.warning("safeusbd: libvirt (%s) cannot be reached (%s); trying again "
                            "every %g s", self.uri, exc.get_error_message(), self.retry)
                self._said_unreachable = True
            return
        try:
            conn.registerCloseCallback(self._on_close, None)
            try:
                conn.setKeepAlive(5, 3)
            except libvirt.libvirtError as exc:  # local drivers have no keepalive
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        self._on_lifecycle, None)
        except libvirt.libvirtError as exc:
            log.warning("safeusbd: libvirt (%s): cannot follow domain events: %s", self.uri,
                        exc.get_error_message())
            conn.close()
            return
        self.conn = conn
        self._said_unreachable = False
        self.connected.set()
        log.info("safeusbd: following libvirt's domain events (%s)", self.uri)

    def _drop(self, libvirt: Any) -> None:
        conn, self.conn = self.conn, None
        self.connected.clear()
        if conn is None:
            return
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass
        if not self.stopping.is_set():
            log.warning("safeusbd: lost libvirt (%s); reconnecting", self.uri)

    def _defined(self, libvirt: Any, name: str) -> None:
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
            dom = self.conn.lookupByName(name)
            line = self.protect(self.conn, dom, libvirt)
        except Exception as exc:
            log.warning("safeusbd: domain %s defined; NOT protected: %s", name, exc)
            return
        self.protected.append(name)
        log.info("safeusbd: domain %s defined; protected (protect_new_domains): %s", name,
                 line)

    # -- callbacks, in libvirt's event loop thread: hand over, never block ---------------

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self.jobs.put(("closed", str(reason)))

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int,
                      _opaque: Any) -> None:
        import libvirt  # noqa: PLC0415

        name = dom.name()
        if event == libvirt.VIR_DOMAIN_EVENT_DEFINED and \
                detail == libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED:
            self.jobs.put(("defined", name))
        elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self.jobs.put(("stopped", name))
        elif event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            self.jobs.put(("started", name))


def domain_active(uri: str) -> Callable[[str], bool | None]:
    """Whether libvirt runs the domain now: True, False (not running, or no such
    domain), None (libvirt cannot say)."""

    def active(name: str) -> bool | None:
        try:
            import libvirt  # noqa: PLC0415
        except ImportError:
            return None
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        try:
            conn = libvirt.openReadOnly(uri)
        except libvirt.libvirtError:
            return None
        try:
            try:
                return bool(conn.lookupByName(name).isActive())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                return None
        finally:
            conn.close()

    return active
