"""libvirt: the one module of safeusb that calls it (libvirt-python, imported when first
used, so that commands that never ask libvirt do not load it).

Every libvirt error leaves this module as :class:`VirtError` (a ``LibvirtError``) with
libvirt's message and error code; libvirt's own default handler, which prints each error
on stderr, is silenced, since every caller says what failed in its own words.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from safeusb.errors import LibvirtError
from safeusb.host import defaults

log = logging.getLogger("safeusb")

# libvirt's values (include/libvirt/*.h), part of its stable ABI.
AFFECT_LIVE = 1  # VIR_DOMAIN_AFFECT_LIVE
AFFECT_CONFIG = 2  # VIR_DOMAIN_AFFECT_CONFIG
ERR_NO_SUPPORT = 3  # VIR_ERR_NO_SUPPORT
ERR_NO_DOMAIN = 42  # VIR_ERR_NO_DOMAIN
# A connection that broke (libvirtd restarted): VIR_ERR_NO_CONNECT, VIR_ERR_INVALID_CONN,
# VIR_ERR_SYSTEM_ERROR, VIR_ERR_RPC.
ERR_GONE = (5, 6, 38, 39)


class VirtError(LibvirtError):
    """libvirt refused or failed a call: its message, and its error code (0 when it gave
    none)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class VirtMissing(VirtError):
    """libvirt-python is not installed."""


_handler_lock = threading.Lock()
_handler_set = False


def _libvirt() -> Any:
    global _handler_set  # noqa: PLW0603 (libvirt's error handler is per process)
    try:
        import libvirt  # noqa: PLC0415
    except ImportError:
        raise VirtMissing("libvirt-python is not installed") from None
    with _handler_lock:
        if not _handler_set:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _handler_set = True
    return libvirt


def load() -> bool:
    """Import libvirt-python now (a service preloads it); whether it is installed."""
    try:
        _libvirt()
    except VirtMissing:
        return False
    return True


@contextlib.contextmanager
def _calling() -> Iterator[Any]:
    """libvirt, with its errors turned into VirtError."""
    libvirt = _libvirt()
    try:
        yield libvirt
    except libvirt.libvirtError as exc:
        raise VirtError(exc.get_error_message() or str(exc),
                        exc.get_error_code() or 0) from None


class Domain:
    """One libvirt domain, on the connection it was looked up on."""

    def __init__(self, dom: Any) -> None:
        self._dom = dom

    @property
    def name(self) -> str:
        with _calling():
            return str(self._dom.name())

    def active(self) -> bool:
        with _calling():
            return bool(self._dom.isActive())

    def persistent(self) -> bool:
        with _calling():
            return bool(self._dom.isPersistent())

    def xml(self, inactive: bool = False, secure: bool = False) -> bytes:
        """The domain's XML: the running one, or its definition (``inactive``); with the
        secrets only when ``secure``."""
        with _calling() as libvirt:
            flags = (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | \
                (libvirt.VIR_DOMAIN_XML_SECURE if secure else 0)
            return str(self._dom.XMLDesc(flags)).encode()

    def attach(self, xml: str, flags: int) -> None:
        """virDomainAttachDeviceFlags; flags of AFFECT_LIVE and AFFECT_CONFIG."""
        with _calling():
            self._dom.attachDeviceFlags(xml, flags)

    def detach(self, xml: str, flags: int) -> None:
        with _calling():
            self._dom.detachDeviceFlags(xml, flags)


class Connection:
    """A connection to libvirt at ``uri`` (None: libvirt's default), closed with
    :meth:`close` or at the end of a ``with`` block."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._following = False

    @classmethod
    def open(cls, uri: str | None, read_only: bool = False) -> Connection:
        with _calling() as libvirt:
            return cls(libvirt.openReadOnly(uri) if read_only else libvirt.open(uri))

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection; a connection libvirt already dropped closes quietly."""
        libvirt = _libvirt()
        if self._following:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.unregisterCloseCallback()
            self._following = False
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()

    def alive(self) -> bool:
        libvirt = _libvirt()
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def uri(self) -> str:
        with _calling():
            return str(self._conn.getURI())

    def domain(self, name: str) -> Domain:
        with _calling():
            return Domain(self._conn.lookupByName(name))

    def domain_by_id(self, domain_id: int) -> Domain:
        with _calling():
            return Domain(self._conn.lookupByID(domain_id))

    def domains(self, persistent_only: bool = False) -> list[Domain]:
        """Every domain (or every defined one), sorted by name."""
        with _calling() as libvirt:
            flags = libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT if persistent_only else 0
            found = [Domain(d) for d in self._conn.listAllDomains(flags)]
        return sorted(found, key=lambda d: d.name)

    def define(self, xml: str) -> None:
        with _calling():
            self._conn.defineXML(xml)

    def capabilities(self) -> bytes:
        with _calling():
            return str(self._conn.getCapabilities()).encode()

    def follow(self, lifecycle: Callable[[str, str], None],
               closed: Callable[[int], None]) -> None:
        """Domain lifecycle events on this connection, from libvirt's event loop thread
        (:func:`start_event_loop`, before the connection was opened): ``lifecycle(kind,
        name)`` for kind "defined" (a new definition, not an update), "started" or
        "stopped"; ``closed(reason)`` once libvirt drops the connection. Keepalive is on
        where the driver has it."""
        with _calling() as libvirt:
            def on_lifecycle(_conn: Any, dom: Any, event: int, detail: int,
                             _opaque: Any) -> None:
                if event == libvirt.VIR_DOMAIN_EVENT_DEFINED and \
                        detail == libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED:
                    lifecycle("defined", str(dom.name()))
                elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
                    lifecycle("stopped", str(dom.name()))
                elif event == libvirt.VIR_DOMAIN_EVENT_STARTED:
                    lifecycle("started", str(dom.name()))

            self._conn.registerCloseCallback(lambda _c, reason, _o: closed(reason), None)
            self._following = True
            try:
                self._conn.setKeepAlive(5, 3)
            except libvirt.libvirtError as exc:  # local drivers have no keepalive
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
            self._conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                              on_lifecycle, None)


_loop_lock = threading.Lock()
_loop_started = False


def start_event_loop() -> None:
    """libvirt's default event implementation, run by one thread for the whole process
    (started before any connection that wants events is opened)."""
    global _loop_started  # noqa: PLW0603 (one event loop per process, as libvirt has)
    with _loop_lock:
        if _loop_started:
            return
        libvirt = _libvirt()
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


def domain_active(uri: str, name: str) -> bool | None:
    """Whether libvirt runs the domain now: True, False (not running, or no such
    domain), None (libvirt cannot say)."""
    try:
        conn = Connection.open(uri, read_only=True)
    except VirtError:
        return None
    with conn:
        try:
            return conn.domain(name).active()
        except VirtError as exc:
            return False if exc.code == ERR_NO_DOMAIN else None


def read_pid_file(path: str, owner: int = 0) -> int | None:
    """The pid in a regular file of the owner that nobody else can write, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_mode & 0o022:
            return None
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() and 0 < int(text) < 2**22 else None


def qemu_pid(domain: str, pid_dir: str = defaults.LIBVIRT_QEMU_PIDS,
             owner: int = 0) -> int | None:
    """The pid libvirtd keeps for the domain's QEMU (a file only root can have written),
    or None."""
    if not domain or "/" in domain or domain in (".", ".."):
        return None
    return read_pid_file(os.path.join(pid_dir, f"{domain}.pid"), owner)
