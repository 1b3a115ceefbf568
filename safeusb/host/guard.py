"""The kernel guard: a BPF LSM program (safeusb/bpf/guard.bpf.c) that refuses, with EBUSY,
to detach usb-storage/uas from a USB interface, whoever asks (usbfs ioctls, sysfs unbind,
authorized, remove, bConfigurationValue), unless safeusb itself is handing it over.

Loaded and pinned under /sys/fs/bpf/safeusb/ through libbpf (libbpf1, by ctypes): the
pinned links keep it attached with no process running. Its refusals arrive in a ring
buffer that safeusbd reads (GuardWatcher): each is logged, kept for `safeusb status`, and
an idle device is prepared by the policy so that the next attempt passes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safeusb.host.bpfload import SAMPLE_FN, BPFError, bpffs, libbpf, mount
from safeusb.values import frozen

log = logging.getLogger("safeusb")

PIN_DIR = "/sys/fs/bpf/safeusb"
OBJECT = Path(__file__).resolve().parent.parent / "bpf" / "guard.bpf.o"
GUARDED_DRIVERS = ("usb-storage", "uas")
PROGRAMS = ("guard_ioctl", "guard_sysfs_write")
MAPS = ("events", "guarded_drivers", "exempt", "counters", "handed_over")
# in the state directory (/run/safeusb), the last ones; not NAME.json, which is a
# device's record there (StateDir)
REFUSALS_FILE = "guard-refusals"
KEEP_REFUSALS = 20
# The same refusal again (same process, device and door, same outcome) within this many
# seconds of the last one is counted on that one instead of logged and kept anew: QEMU
# closing a dead device asks usbfs CONNECT dozens of times in a row.
REPEAT_WINDOW = 10.0
REPEAT_REPORT = 60.0  # a run of repeats that goes on is told at least this often
BOOT_HINT = "lsm=lockdown,capability,landlock,yama,apparmor,bpf"

# Exit codes of `safeusb guard status`.
STATUS_ON = 0
STATUS_OFF = 3         # available, not enabled
STATUS_UNAVAILABLE = 4  # this kernel cannot run it (the reason is printed)

KINDS = {
    1: "usbfs USBDEVFS_DISCONNECT",
    2: "usbfs USBDEVFS_DISCONNECT_CLAIM",
    3: "sysfs unbind",
    4: "sysfs authorized",
    5: "sysfs remove",
    6: "sysfs bConfigurationValue",
    7: "sysfs bind",
    8: "sysfs new_id",
    9: "sysfs drivers_probe",
    10: "usbfs USBDEVFS_CONNECT",
}
# Kinds that would bind a driver (refused while safeusb has a device handed over), and
# those whose written text names the interface (a driver's unbind or bind, drivers_probe).
BINDING_KINDS = frozenset({7, 8, 9, 10})
WRITTEN_NAMES_INTERFACE = frozenset({3, 7, 9})


GuardError = BPFError  # libbpf's failures are the guard's


# --- the kernel's side -----------------------------------------------------------------

@frozen
class Availability:
    available: bool
    reasons: list[str]
    lsms: list[str] | None
    hint: str | None


def _securityfs(sys_root: str) -> str:
    path = os.path.join(sys_root, "kernel/security")
    if not os.path.exists(os.path.join(path, "lsm")) and os.geteuid() == 0 and \
            sys_root == "/sys":
        with contextlib.suppress(OSError):
            mount("securityfs", path, "securityfs")
    return path


def availability(sys_root: str = "/sys") -> Availability:
    """Can this kernel run the guard? Every missing piece, with the boot parameter."""
    reasons: list[str] = []
    hint: str | None = None
    sec = _securityfs(sys_root)
    lsms: list[str] | None = None
    try:
        lsms = Path(sec, "lsm").read_text().strip().split(",")
    except OSError as exc:
        reasons.append(f"the active LSMs cannot be read ({os.path.join(sec, 'lsm')}: "
                       f"{exc.strerror}): securityfs is not there, or the kernel has no LSM "
                       "support")
    if lsms is not None and "bpf" not in lsms:
        reasons.append(f"BPF LSM is not active (active: {','.join(lsms)})")
        hint = (f"boot with lsm={','.join([*lsms, 'bpf'])} on the kernel command line "
                "(the kernel must be built with CONFIG_BPF_LSM=y)")
    if not os.path.exists(os.path.join(sys_root, "kernel/btf/vmlinux")):
        reasons.append("the kernel has no BTF (/sys/kernel/btf/vmlinux: "
                       "CONFIG_DEBUG_INFO_BTF)")
    try:
        lockdown = Path(sec, "lockdown").read_text()
        if "[confidentiality]" in lockdown:
            reasons.append("the kernel is locked down to confidentiality, which refuses "
                           "the kernel reads the guard makes")
    except OSError:
        pass
    if not reasons and os.geteuid() == 0 and sys_root == "/sys":
        probe = probe_lsm_programs()
        if probe is not None:
            reasons.append(probe)
    if not OBJECT.exists():
        reasons.append(f"the guard's BPF object is not built ({OBJECT}; scripts/build-bpf)")
    return Availability(not reasons, reasons, lsms, hint)


BPF_PROG_TYPE_LSM = 29


def probe_lsm_programs() -> str | None:
    """Does the kernel load a BPF LSM program (libbpf's probe: a minimal program)? None
    when it does, else why not. Root only."""
    try:
        lib = libbpf().lib
    except GuardError as exc:
        return str(exc)
    rc = int(lib.libbpf_probe_bpf_prog_type(BPF_PROG_TYPE_LSM, None))
    if rc == 1:
        return None
    why = os.strerror(-rc) if rc < 0 else "the probe program was refused"
    return ("the kernel does not load BPF LSM programs although bpf is among the active "
            f"LSMs ({why}): it may lack BPF trampolines (CONFIG_DYNAMIC_FTRACE_WITH_"
            "DIRECT_CALLS) or run in a sandbox that forbids them")


def enabled(pin_dir: str = PIN_DIR) -> bool:
    return all(os.path.exists(os.path.join(pin_dir, f"link_{p}")) for p in PROGRAMS)


def _obj_get(path: str) -> int:
    fd = int(libbpf().lib.bpf_obj_get(path.encode()))
    if fd < 0:
        raise libbpf().err(f"cannot open {path}", fd)
    return fd


# --- enable / disable ------------------------------------------------------------------

@dataclass
class Loaded:
    load_seconds: float
    attach_seconds: float
    object_bytes: int


def enable(drivers: tuple[str, ...] = GUARDED_DRIVERS, pin_dir: str = PIN_DIR,
           obj_path: Path = OBJECT, handed_over_ports: tuple[str, ...] = (),
           sys_root: str = "/sys") -> Loaded | None:
    """Load, attach and pin the guard; None when it already was. handed_over_ports: the
    devices safeusb has handed over already (their records), entered before it attaches."""
    if enabled(pin_dir):
        return None
    avail = availability()
    if not avail.available:
        raise GuardError("; ".join(avail.reasons))
    bpffs()
    disable(pin_dir)  # a half-pinned guard from an interrupted enable
    os.makedirs(pin_dir, mode=0o700, exist_ok=True)
    lib = libbpf().lib
    t0 = time.monotonic()
    obj = lib.bpf_object__open_file(str(obj_path).encode(), None)
    if not obj:
        raise libbpf().err(f"cannot open {obj_path}")
    links: list[int] = []
    try:
        rc = lib.bpf_object__load(obj)
        if rc:
            raise libbpf().err("the kernel refused to load the guard (libbpf's log above)",
                               rc)
        t1 = time.monotonic()
        # The driver names first: from the moment it is attached it refuses.
        dmap = lib.bpf_object__find_map_by_name(obj, b"guarded_drivers")
        one = ctypes.c_uint8(1)
        for d in drivers:
            key = ctypes.create_string_buffer(d.encode(), 32)
            if lib.bpf_map_update_elem(lib.bpf_map__fd(dmap), key, ctypes.byref(one), 0):
                raise libbpf().err(f"cannot guard {d}")
        hmap = lib.bpf_object__find_map_by_name(obj, b"handed_over")
        for port in handed_over_ports:
            ino = device_inode(port, sys_root)
            if ino is not None:
                _map_put(lib.bpf_map__fd(hmap), ino)
        for m in MAPS:
            mp = lib.bpf_object__find_map_by_name(obj, m.encode())
            rc = lib.bpf_map__pin(mp, os.path.join(pin_dir, m).encode())
            if rc:
                raise libbpf().err(f"cannot pin map {m}", rc)
        for name in PROGRAMS:
            prog = lib.bpf_object__find_program_by_name(obj, name.encode())
            link = lib.bpf_program__attach(prog)
            if not link:
                raise libbpf().err(f"cannot attach {name}")
            links.append(link)
            rc = lib.bpf_link__pin(link, os.path.join(pin_dir, f"link_{name}").encode())
            if rc:
                raise libbpf().err(f"cannot pin {name}", rc)
        t2 = time.monotonic()
    except BaseException:
        for link in links:
            lib.bpf_link__destroy(link)
        lib.bpf_object__close(obj)
        disable(pin_dir)
        raise
    for link in links:  # the pins keep them attached
        lib.bpf_link__destroy(link)
    lib.bpf_object__close(obj)
    log.info("guard: enabled (drivers %s)", ", ".join(drivers))
    return Loaded(t1 - t0, t2 - t1, obj_path.stat().st_size)


def disable(pin_dir: str = PIN_DIR) -> bool:
    """Unpin everything: the links go first, so nothing is refused from then on. True when
    something was pinned."""
    if not os.path.isdir(pin_dir):
        return False
    names = [f"link_{p}" for p in PROGRAMS] + list(MAPS)
    names += sorted(set(os.listdir(pin_dir)) - set(names))
    for n in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(pin_dir, n))
    os.rmdir(pin_dir)
    log.info("guard: disabled")
    return True


def counters(pin_dir: str = PIN_DIR) -> dict[str, int]:
    fd = _obj_get(os.path.join(pin_dir, "counters"))
    try:
        out: dict[str, int] = {}
        for i, name in enumerate(("refused", "exempted", "events_lost")):
            key, val = ctypes.c_uint32(i), ctypes.c_uint64(0)
            if libbpf().lib.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(val)):
                raise libbpf().err("cannot read the guard's counters")
            out[name] = int(val.value)
        return out
    finally:
        os.close(fd)


@contextlib.contextmanager
def handover(pin_dir: str = PIN_DIR) -> Iterator[None]:
    """Let this process detach guarded drivers (safeusb's own handover) while inside.

    The mark is kept on this process's task in the kernel (task storage, set through a
    pidfd), so it cannot outlive it or pass to another process. Without the guard it is
    a no-op; when the guard is on and the mark cannot be set, this raises: the unbind
    would be refused anyway, and the reason is clearer."""
    path = os.path.join(pin_dir, "exempt")
    if not os.path.exists(path):
        yield
        return
    fd = _obj_get(path)
    pidfd = os.pidfd_open(os.getpid())
    key, val = ctypes.c_int(pidfd), ctypes.c_uint64(1)
    try:
        if libbpf().lib.bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(val), 0):
            raise libbpf().err("cannot let safeusb's own handover past the kernel guard")
        try:
            yield
        finally:
            libbpf().lib.bpf_map_delete_elem(fd, ctypes.byref(key))
    finally:
        os.close(pidfd)
        os.close(fd)


# --- devices handed over --------------------------------------------------------------
#
# The kernel keeps the sysfs directory's inode number (kernfs id, never reused) of every
# USB device safeusb handed over; while there is any, binding usb-storage/uas (bind,
# new_id, drivers_probe) is refused, and so is anything that makes a handed-over device
# probe drivers again (usbfs CONNECT, authorized, bConfigurationValue, remove). safeusb
# enters a device before it unbinds the driver, and takes it out once the device's record
# is gone (given back, or the device left).

HANDED_OVER = "handed_over"


def device_inode(port: str, sys_root: str = "/sys") -> int | None:
    """The inode number of the USB device's sysfs directory (2-1), None when it is gone."""
    if not port or "/" in port or port.startswith("."):
        return None
    try:
        return os.stat(os.path.join(sys_root, "bus/usb/devices", port)).st_ino
    except OSError:
        return None


def _map_put(fd: int, ino: int) -> None:
    key, val = ctypes.c_uint64(ino), ctypes.c_uint64(int(time.time()))
    if libbpf().lib.bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(val), 0):
        raise libbpf().err("cannot record a device as handed over in the kernel guard")


def _handed_over_fd(pin_dir: str) -> int | None:
    path = os.path.join(pin_dir, HANDED_OVER)
    if not enabled(pin_dir) or not os.path.exists(path):
        return None
    return _obj_get(path)


def mark_handed_over(port: str, sys_root: str = "/sys", pin_dir: str = PIN_DIR) -> None:
    """Before safeusb unbinds the driver of port's device: nothing else may bind it again
    while it is handed over. No-op without the guard; GuardError when the guard is on and
    the entry cannot be made (the handover must not go on unguarded)."""
    fd = _handed_over_fd(pin_dir)
    if fd is None:
        return
    try:
        ino = device_inode(port, sys_root)
        if ino is None:
            raise GuardError(f"{port} is not in sysfs: it cannot be recorded as handed over")
        _map_put(fd, ino)
    finally:
        os.close(fd)


def handed_over_ids(pin_dir: str = PIN_DIR) -> list[int]:
    """The kernel's entries (sysfs inode numbers); [] without the guard."""
    fd = _handed_over_fd(pin_dir)
    if fd is None:
        return []
    try:
        return _keys(fd)
    finally:
        os.close(fd)


def _keys(fd: int) -> list[int]:
    lib = libbpf().lib
    out: list[int] = []
    key, nxt = ctypes.c_uint64(0), ctypes.c_uint64(0)
    prev = None
    while len(out) < 4096:
        if lib.bpf_map_get_next_key(fd, prev, ctypes.byref(nxt)):
            break
        out.append(int(nxt.value))
        key.value = nxt.value
        prev = ctypes.byref(key)
    return out


def forget_given_back(recorded_ports: list[str], sys_root: str = "/sys",
                      pin_dir: str = PIN_DIR) -> list[int]:
    """Take out every entry that is no longer the device of a record (given back, or the
    device left: its directory, and so its inode, is gone). Returns those taken out.
    Entries are only ever added by mark_handed_over (before the unbind), never here, so a
    prepare running meanwhile keeps its entry: its record exists from its start."""
    fd = _handed_over_fd(pin_dir)
    if fd is None:
        return []
    try:
        keep = {ino for p in recorded_ports if (ino := device_inode(p, sys_root)) is not None}
        gone = [k for k in _keys(fd) if k not in keep]
        for k in gone:
            key = ctypes.c_uint64(k)
            libbpf().lib.bpf_map_delete_elem(fd, ctypes.byref(key))
        return gone
    finally:
        os.close(fd)


def forget_released(state_dir: str, sys_root: str = "/sys", pin_dir: str = PIN_DIR) -> None:
    """forget_given_back by the records in the state directory; never raises (a stale
    entry only keeps bind refused, which is the safe side), but logs why."""
    from safeusb.host.journal import StateDir  # noqa: PLC0415

    try:
        if not os.path.exists(os.path.join(pin_dir, HANDED_OVER)):
            return
        keys, problems = StateDir(state_dir).keys()
        if problems:
            log.warning("guard: records that cannot be read keep their devices guarded: %s",
                        "; ".join(problems))
            return
        forget_given_back(keys, sys_root, pin_dir)
    except (GuardError, OSError) as exc:
        log.warning("guard: devices given back are still recorded in the kernel: %s", exc)


# --- refusals ---------------------------------------------------------------------------

class _Event(ctypes.Structure):
    _fields_ = [  # mirrors struct guard_event in bpf/guard.bpf.c
        ("device_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),
        ("ifnum", ctypes.c_int32),
        ("busnum", ctypes.c_uint32),
        ("devnum", ctypes.c_uint32),
        ("vendor", ctypes.c_uint16),
        ("product", ctypes.c_uint16),
        ("comm", ctypes.c_char * 16),
        ("port", ctypes.c_char * 32),
        ("driver", ctypes.c_char * 32),
        ("serial", ctypes.c_char * 64),
        ("written", ctypes.c_char * 32),
        ("start_time", ctypes.c_uint64),
    ]


def _text(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass
class Refusal:
    time: float
    pid: int
    comm: str
    uid: int
    kind: str
    driver: str
    port: str           # sysfs name of the device (2-1), "" when the kernel did not say
    interface: str      # 2-1:1.0 when known
    vendor_product: str
    serial: str
    device_id: int      # kernfs id of the device's sysfs directory (never reused)
    outcome: str = ""   # what the service did about it
    start_time: int = 0  # the process's start, boot-time ns (to know it again)
    binding: bool = False  # a bind refused while a device is handed over
    domain: str = ""    # the libvirt domain whose QEMU it is, confirmed by libvirt

    @classmethod
    def from_bytes(cls, data: bytes) -> Refusal:
        e = _Event.from_buffer_copy(data[:ctypes.sizeof(_Event)])
        port = _text(e.port)
        interface = ""
        written = _text(e.written).strip()
        if not port and written and int(e.kind) in WRITTEN_NAMES_INTERFACE:
            # a driver's unbind/bind file, drivers_probe: the interface written to it (as
            # the caller's memory read then: for the report, never to decide)
            interface = written
            port = written.split(":", 1)[0]
        elif port and e.ifnum >= 0:
            interface = ""  # filled by the service from sysfs (configuration.number)
        vp = f"{e.vendor:04x}:{e.product:04x}" if e.vendor or e.product else ""
        return cls(time.time(), int(e.pid), _text(e.comm), int(e.uid),
                   KINDS.get(int(e.kind), f"kind {e.kind}"), _text(e.driver), port, interface,
                   vp, _text(e.serial), int(e.device_id), "", int(e.start_time),
                   int(e.kind) in BINDING_KINDS or not _text(e.driver))

    def who(self) -> str:
        dom = f", QEMU of domain {self.domain}" if self.domain else ""
        return f"pid {self.pid} ({self.comm}, uid {self.uid}{dom})"

    def describe(self) -> str:
        what = self.interface or self.port or "a USB interface"
        ident = " ".join(x for x in (self.vendor_product,
                                     f"serial {self.serial}" if self.serial else "") if x)
        ident = f" ({ident})" if ident else ""
        if self.binding:
            drv = f" {self.driver}" if self.driver else " a driver"
            return (f"{self.who()} tried to bind{drv} to {what}{ident} through {self.kind} "
                    "while safeusb has a device handed over: refused")
        return (f"{self.who()} tried to detach {self.driver} from {what}{ident} through "
                f"{self.kind}: refused")


# What makes two refusals the same one (with the outcome, compared apart).
_SAME = ("pid", "start_time", "uid", "comm", "kind", "driver", "port", "interface",
         "device_id", "binding", "domain")


@dataclass
class _Repeats:
    """Repeats of one kept refusal not yet told in the log."""

    text: str   # the refusal's describe()
    count: int  # how many since last told
    since: float
    last: float


class RefusalLog:
    """The last refusals, in STATE_DIR/guard-refusals (JSON; root's, mode 0600). The same
    refusal again within REPEAT_WINDOW seconds raises the kept one's ``count`` (and
    ``last``, its time) instead of being kept anew; ``due`` says, once in a while, how many
    such repeats there were."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, REFUSALS_FILE)
        self._lock = threading.Lock()
        self._repeats: dict[tuple[Any, ...], _Repeats] = {}

    @staticmethod
    def _key(item: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(item.get(k) for k in _SAME)

    @classmethod
    def _match(cls, items: list[dict[str, Any]], r: Refusal) -> dict[str, Any] | None:
        """The last kept refusal like ``r`` (same process, device and door), if its last
        one was at most REPEAT_WINDOW seconds before ``r``."""
        key = cls._key(asdict(r))
        for item in reversed(items):
            if cls._key(item) == key:
                last = item.get("last", item.get("time"))
                fresh = isinstance(last, int | float) and 0 <= r.time - last <= REPEAT_WINDOW
                return item if fresh else None
        return None

    def earlier(self, r: Refusal) -> dict[str, Any] | None:
        """The kept refusal ``r`` repeats, if any (see _match)."""
        return self._match(self.read(), r)

    def repeat(self, r: Refusal) -> bool:
        """Count ``r`` on the kept refusal it repeats with the same outcome; False (nothing
        counted) when there is none."""
        with self._lock:
            items = self.read()
            item = self._match(items, r)
            if item is None or item.get("outcome") != r.outcome:
                return False
            count = item.get("count", 1)
            item["count"] = (count if isinstance(count, int) else 1) + 1
            item["last"] = r.time
            self._write(items)
            rep = self._repeats.setdefault((*self._key(item), r.outcome),
                                           _Repeats(r.describe(), 0, r.time, r.time))
            rep.count += 1
            rep.last = r.time
            return True

    def due(self, now: float | None = None) -> list[str]:
        """Lines for the log: the repeats not yet told, of refusals that stopped repeating
        (none for REPEAT_WINDOW seconds) or that have gone on for REPEAT_REPORT seconds."""
        now = time.time() if now is None else now
        lines: list[str] = []
        with self._lock:
            for key, rep in list(self._repeats.items()):
                if now - rep.last >= REPEAT_WINDOW or now - rep.since >= REPEAT_REPORT:
                    lines.append(f"{rep.text} again {rep.count} more time"
                                 f"{'' if rep.count == 1 else 's'} within "
                                 f"{max(rep.last - rep.since, 0.0):.0f} s")
                    del self._repeats[key]
        return lines

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return []
        return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []

    def add(self, r: Refusal) -> None:
        with self._lock:
            self._write([*self.read(), {**asdict(r), "count": 1, "last": r.time}])

    def _write(self, items: list[dict[str, Any]]) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o711, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".refusals.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(items[-KEEP_REFUSALS:], f, indent=1)
        os.replace(tmp, self.path)


Handler = Callable[[Refusal], str]


@dataclass
class GuardWatcher:
    """Reads the guard's refusals while it is enabled (it may be enabled later)."""

    handle: Handler
    pin_dir: str = PIN_DIR
    state_dir: str | None = None  # where to say which process reads (READER_FILE)
    tick: Callable[[], None] | None = None  # after each wait for refusals (RefusalLog.due)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, daemon=True, name="safeusbd-guard")
        t.start()
        return t

    def run(self) -> None:
        while not self.stopping.is_set():
            path = os.path.join(self.pin_dir, "events")
            if not enabled(self.pin_dir) or not os.path.exists(path):
                self.stopping.wait(1.0)
                continue
            try:
                self._consume(path)
            except Exception:
                log.exception("guard: reading refusals failed; retrying")
                self.stopping.wait(1.0)

    def _consume(self, path: str) -> None:
        lib = libbpf().lib
        fd = _obj_get(path)
        pending: list[Refusal] = []

        def sample(_ctx: int | None, data: int | None, size: int) -> int:
            if data:
                pending.append(Refusal.from_bytes(ctypes.string_at(data, size)))
            return 0

        cb = SAMPLE_FN(sample)
        rb = lib.ring_buffer__new(fd, cb, None, None)
        if not rb:
            os.close(fd)
            raise libbpf().err("cannot read the guard's ring buffer")
        log.info("guard: reading refusals from %s", path)
        reader = os.path.join(self.state_dir, READER_FILE) if self.state_dir else None
        if reader:
            os.makedirs(os.path.dirname(reader), mode=0o711, exist_ok=True)
            Path(reader).write_text(f"{os.getpid()}\n")
        try:
            while not self.stopping.is_set() and enabled(self.pin_dir):
                n = lib.ring_buffer__poll(rb, 500)
                if n < 0 and n != -errno.EINTR:
                    raise libbpf().err("ring buffer poll", n)
                while pending:
                    r = pending.pop(0)
                    try:
                        r.outcome = self.handle(r)
                    except Exception as exc:  # one refusal's trouble never stops the watch
                        log.exception("guard: handling a refusal failed")
                        r.outcome = f"not handled: {exc}"
                if self.tick is not None:
                    self.tick()
        finally:
            lib.ring_buffer__free(rb)
            os.close(fd)
            if reader:
                with contextlib.suppress(OSError):
                    os.unlink(reader)


# --- what the service does with a refusal -------------------------------------------------

READER_FILE = "guard-reader"  # in the state directory: the pid of the safeusbd reading


def device_dir(r: Refusal, sys_root: str = "/sys") -> str | None:
    """The refused device's sysfs directory, if it is still the same device (its kernfs id,
    which is the directory's inode number, is never reused)."""
    if not r.port or "/" in r.port or r.port.startswith("."):
        return None
    path = os.path.join(sys_root, "bus/usb/devices", r.port)
    try:
        st = os.stat(path)
    except OSError:
        return None
    if r.device_id and st.st_ino != r.device_id:
        return None
    return os.path.realpath(path)


def handle_refusal(r: Refusal, prepare: Callable[[str, str | None], tuple[bool, str]],
                   refusals: RefusalLog, already_taken: Callable[[str], bool],
                   sys_root: str = "/sys",
                   domain_of: Callable[[Refusal], str | None] | None = None) -> str:
    """Log the refusal; prepare an idle device by the policy so the next attempt passes.
    The same refusal again, with the same outcome, within REPEAT_WINDOW seconds is counted
    on the one kept (RefusalLog.repeat), not logged nor kept anew.

    prepare(port, domain) -> (done, text): safeusb's own prepare under the service's
    policy (it inspects first and refuses a busy device with the reasons). domain_of: the
    libvirt domain whose QEMU the refused process is, as libvirt confirms it, or None."""
    if domain_of is not None:
        try:
            r.domain = domain_of(r) or ""
        except Exception:  # naming the domain is for the report; the refusal stands
            log.exception("guard: the domain of pid %d cannot be told", r.pid)
    earlier = refusals.earlier(r)
    if earlier is None:
        log.warning("guard: %s", r.describe())
    if r.binding:
        outcome = ("nothing is bound while safeusb has the device handed over; "
                   "`safeusb release` gives it back")
    elif not r.port:
        outcome = "the device is not known (the kernel did not say which): nothing prepared"
    elif device_dir(r, sys_root) is None:
        outcome = f"{r.port} is no longer the device that was refused: nothing prepared"
    elif already_taken(r.port):
        outcome = f"{r.port} is already taken by safeusb: nothing more to do"
    else:
        done, text = prepare(r.port, r.domain or None)
        if done and r.kind == "sysfs unbind":
            # what the unbind asked is done; writing it again is refused all the same
            # (the hook does not read which interface is written)
            outcome = (f"{r.port} was idle: prepared by the policy ({text}); {r.driver} "
                       f"is unbound from it now, as asked; `safeusb release {r.port}` "
                       f"gives it back")
        elif done:
            outcome = (f"{r.port} was idle: prepared by the policy ({text}); the next "
                       f"attempt passes; `safeusb release {r.port}` gives it back")
        else:
            outcome = f"{r.port} stays with the host: {text}"
    r.outcome = outcome
    if earlier is not None and refusals.repeat(r):
        # the same as the last one kept: counted there, told later by RefusalLog.due
        log.debug("guard: %s (again): %s", r.describe(), outcome)
        return outcome
    if earlier is not None:
        log.warning("guard: %s", r.describe())
    log.warning("guard: %s: %s", r.interface or r.port or "?", outcome)
    refusals.add(r)
    return outcome


def report(state_dir: str, pin_dir: str = PIN_DIR) -> dict[str, Any]:
    """The guard's state for `safeusb guard status` and `safeusb status`."""
    avail = availability()
    on = enabled(pin_dir)
    out: dict[str, Any] = {
        "available": avail.available, "enabled": on, "unavailable_because": avail.reasons,
        "boot_parameter": avail.hint, "lsms": avail.lsms,
        "guarded_drivers": list(GUARDED_DRIVERS), "counters": None, "reader": None,
        "refusals": RefusalLog(state_dir).read(),
    }
    if on:
        try:
            out["counters"] = counters(pin_dir)
        except GuardError as exc:
            out["counters_error"] = str(exc)
        out["reader"] = _reader(state_dir)
        try:
            out["handed_over"] = len(handed_over_ids(pin_dir))
        except GuardError as exc:
            out["handed_over_error"] = str(exc)
    return out


def _reader(state_dir: str) -> int | None:
    try:
        pid = int(Path(state_dir, READER_FILE).read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm.startswith(("safeusbd", "python")) else None


def as_text(rep: dict[str, Any], refusals: int = 5) -> str:
    if rep["enabled"]:
        c = rep.get("counters") or {}
        lines = [f"guard: on: detaching {', '.join(rep['guarded_drivers'])} is refused "
                 f"unless safeusb hands the device over ({c.get('refused', '?')} refused, "
                 f"{c.get('exempted', '?')} let through for safeusb)"]
        if c.get("events_lost"):
            lines.append(f"  {c['events_lost']} refusals were not reported (the ring buffer "
                         "was full); they were refused all the same")
        if rep.get("handed_over"):
            lines.append(f"  {rep['handed_over']} device(s) handed over by safeusb: binding "
                         f"{', '.join(rep['guarded_drivers'])} (bind, new_id, drivers_probe) "
                         "is refused until they are given back")
        if rep.get("reader") is None:
            lines.append("  refusals are not being read: safeusbd is not running (they are "
                         "still refused, but not logged and nothing is prepared)")
    elif rep["available"]:
        lines = ["guard: off (available: `safeusb guard enable`)"]
    else:
        lines = ["guard: not available on this kernel: " + "; ".join(rep["unavailable_because"])]
        if rep.get("boot_parameter"):
            lines.append(f"  to enable it: {rep['boot_parameter']}")
    for r in rep["refusals"][-refusals:]:
        when = time.strftime("%H:%M:%S", time.localtime(float(r.get("time", 0))))
        what = r.get("interface") or r.get("port") or "?"
        dom = f", QEMU of domain {r['domain']}" if r.get("domain") else ""
        to = f" to domain {r['domain']}" if r.get("domain") else ""
        n = r.get("count", 1)
        if isinstance(n, int) and n > 1:
            last = time.strftime("%H:%M:%S", time.localtime(float(r.get("last", 0))))
            to += f" ({n} times, the last at {last})"
        lines.append(f"  {when} pid {r.get('pid')} ({r.get('comm')}, uid {r.get('uid')}{dom}) "
                     f"{r.get('kind')} of {what} {r.get('vendor_product', '')} "
                     f"serial {r.get('serial') or '-'}: refused{to}"
                     + (f": {r['outcome']}" if r.get("outcome") else ""))
    return "\n".join(lines) + "\n"
