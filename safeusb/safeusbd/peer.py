"""Who is asking safeusbd: the peer's credentials, the libvirt domain its process belongs
to (told from the system, never from the request), and what it may ask.

Rules: uid 0 may ask anything. A process in a libvirt QEMU domain's cgroup scope, confirmed
against libvirt (the running domain with that ID exists and its QEMU process, from
libvirt's pid file, is in the same scope), may prepare and release devices for that domain
only. Everyone else may ping and, unless the daemon was told otherwise, inspect.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any, Literal

from safeusb.host import defaults, virt
from safeusb.host.procfs import read_cgroup
from safeusb.host.roots import PROC
from safeusb.safeusbd.protocol import ACTING_OPS
from safeusb.values import frozen

Role = Literal["root", "domain", "other"]

# systemd-machined scope: machine-qemu\x2d<ID>\x2d<name>.scope (systemd escapes '-' as
# \x2d); libvirt's own cgroupfs layout without systemd: qemu-<ID>-<name>.libvirt-qemu.
_SYSTEMD_SCOPE = re.compile(r"^machine-qemu\\x2d(\d{1,9})\\x2d(.+)\.scope$")
_CGROUPFS_SCOPE = re.compile(r"^qemu-(\d{1,9})-(.+)\.libvirt-qemu$")
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


@frozen
class MachineScope:
    """The cgroup of a libvirt QEMU domain that a process lies in."""

    domain_id: int
    name: str  # as in the scope: libvirt shortens and strips names, so only a hint
    path: str  # the cgroup path down to and including the scope


def _unescape(text: str) -> str:
    raw = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    try:
        return raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return raw


def _scope_of_path(path: str) -> MachineScope | None:
    parts = path.split("/")
    for i, part in enumerate(parts):
        m = _SYSTEMD_SCOPE.match(part)
        name = _unescape(m.group(2)) if m else None
        if m is None:
            m = _CGROUPFS_SCOPE.match(part)
            name = m.group(2) if m else None
        if m is not None and name is not None:
            return MachineScope(int(m.group(1)), name, "/".join(parts[: i + 1]))
    return None


def machine_scope(cgroup_text: str) -> MachineScope | None:
    """The libvirt QEMU scope in a /proc/PID/cgroup text, or None.

    Only the lines that say which unit a process belongs to count: the unified hierarchy
    (``0::/path``, cgroup v2 and hybrid) and systemd's own v1 hierarchy (``N:name=systemd:``).
    When they name different scopes, or none, the process is in no domain's scope."""
    found: set[MachineScope | None] = set()
    for line in cgroup_text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if (hierarchy == "0" and controllers == "") or controllers == "name=systemd":
            found.add(_scope_of_path(path))
    if len(found) != 1:
        return None
    return found.pop()


@frozen
class Peer:
    pid: int
    uid: int
    gid: int


@frozen
class Caller:
    """A peer, with what it is to the daemon and why."""

    peer: Peer
    role: Role
    domain: str | None = None
    why: str = ""

    def describe(self) -> str:
        who = f"pid {self.peer.pid} uid {self.peer.uid}"
        if self.role == "domain":
            return f"{who} (QEMU of domain {self.domain})"
        return f"{who} ({self.role})"

    def as_json(self) -> dict[str, Any]:
        return {"pid": self.peer.pid, "uid": self.peer.uid, "gid": self.peer.gid,
                "role": self.role, "domain": self.domain}


DomainResolver = Callable[[MachineScope], tuple[str | None, str]]
"""The name of the running libvirt domain a scope is confirmed to be, or None, and why."""


def classify(peer: Peer, cgroup_text: str | None, resolve: DomainResolver) -> Caller:
    """What the peer is: root by uid, a domain's QEMU by its cgroup confirmed by libvirt,
    anyone else otherwise."""
    if peer.uid == 0:
        return Caller(peer, "root", why="uid 0")
    if cgroup_text is None:
        return Caller(peer, "other", why="its cgroup cannot be read")
    scope = machine_scope(cgroup_text)
    if scope is None:
        return Caller(peer, "other", why="not in a libvirt QEMU domain's cgroup")
    name, why = resolve(scope)
    if name is None:
        return Caller(peer, "other", why=f"cgroup {scope.path}, but {why}")
    return Caller(peer, "domain", name, why=f"cgroup {scope.path}, {why}")


def refusal(caller: Caller, op: str, domain: str | None, others_may_inspect: bool) -> str | None:
    """Why the caller may not make this request, or None when it may."""
    if caller.role == "root" or op == "ping":
        return None
    if op == "inspect":
        if caller.role == "domain" or others_may_inspect:
            return None
        return "inspect is for root and libvirt QEMU processes on this host"
    if op not in ACTING_OPS:
        return f"unknown op {op!r}"
    if caller.role == "domain":
        if domain is None:
            return f"a QEMU process of domain {caller.domain} must name its domain"
        if domain != caller.domain:
            return (f"a QEMU process of domain {caller.domain} may {op} devices only for "
                    f"that domain, not for {domain!r}")
        return None
    return (f"only root or a QEMU process that libvirt started for the domain may {op} "
            f"devices ({caller.why})")


class LibvirtResolver:
    """Confirms a scope against libvirt: the running domain with the scope's ID, whose
    QEMU process (libvirt's pid file for it) is in the same scope."""

    def __init__(self, uri: str = "qemu:///system", proc: str = PROC,
                 pid_dir: str = defaults.LIBVIRT_QEMU_PIDS) -> None:
        self.uri = uri
        self.proc = proc
        self.pid_dir = pid_dir
        self.pid_owner = 0  # libvirtd writes the pid files as root
        self._lock = threading.Lock()
        self._conn: virt.Connection | None = None

    def __call__(self, scope: MachineScope) -> tuple[str | None, str]:
        for attempt in (1, 2):
            try:
                conn = self._connection()
            except virt.VirtMissing:
                return None, "libvirt-python is not installed, so no domain can be confirmed"
            except virt.VirtError as exc:
                return None, f"libvirt ({self.uri}) cannot be reached: {exc}"
            try:
                name = conn.domain_by_id(scope.domain_id).name
                break
            except virt.VirtError as exc:
                if attempt == 1 and exc.code in virt.ERR_GONE:
                    self._drop(conn)  # libvirtd restarted: ask a new connection once
                    continue
                return None, f"libvirt has no running domain with ID {scope.domain_id}"
        return self.confirm(scope, name)

    def _connection(self) -> virt.Connection:
        """One read-only connection, kept while libvirt keeps it (opening one for each
        caller cost a noticeable part of a decision)."""
        with self._lock:
            conn = self._conn
            if conn is not None:
                if conn.alive():
                    return conn
                self._conn = None
                conn.close()
            self._conn = virt.Connection.open(self.uri, read_only=True)
            return self._conn

    def _drop(self, conn: virt.Connection) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
        conn.close()

    def confirm(self, scope: MachineScope, name: str) -> tuple[str | None, str]:
        """The name, when libvirt's QEMU process for that domain is in the scope."""
        if not name or "/" in name or name in (".", ".."):
            return None, f"libvirt names the domain {name!r}, which is no file name"
        pid = virt.qemu_pid(name, self.pid_dir, self.pid_owner)
        if pid is None:
            return None, (f"{self.pid_dir}/{name}.pid does not hold a pid that only root can "
                          "have written")
        cgroup = read_cgroup(pid, self.proc)
        if cgroup is None:
            return None, f"the QEMU process of domain {name} (pid {pid}) is gone"
        theirs = machine_scope(cgroup)
        if theirs is None or theirs.path != scope.path:
            return None, (f"the QEMU process of domain {name} (pid {pid}) is not in "
                          f"{scope.path}")
        return name, f"domain {name} (ID {scope.domain_id}, QEMU pid {pid})"

