"""The in-kernel scan: what processes hold on a device, found by BPF iterators in one
pass (safeusb/bpf/scan.bpf.c), with the same findings as the /proc scan (procfs.py).

The kernel walks every task's working and root directory, open files and file-backed
mappings and writes out only those on the device's filesystems (by s_dev) and nodes (by
i_rdev). The mappings, the longest walk, are read in a thread of their own beside the
rest; where the kernel has the open-coded mapping iterator (Linux >= 6.7), in two halves
of the processes, each in its own thread, and a process whose mappings have not changed
since they were last walked, and held nothing looked for, is passed over (the summaries
scan.bpf.c keeps; _want() says what is looked for in their terms). Here only the matches
are looked at: their names are read from /proc as the /proc scan reads them (the
descriptor's link, the cwd and root links, the maps of a process that maps the device),
so the two give the same findings.

Used where it can be (root, Linux >= 5.12 with BTF, libbpf1, the object built by
scripts/build-bpf, the live system, the initial pid namespace); anywhere else, or when
anything of it fails, the /proc scan runs instead and the reason is logged (debug).
SAFEUSB_SCAN=proc chooses the /proc scan, SAFEUSB_SCAN=kernel refuses to fall back.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import stat
import struct
import threading
from typing import Any

from safeusb.host.bpfload import BPFError, bpffs, libbpf
from safeusb.host.model import DevNum, NodeKind, ProcessUse, Unreadable, UseKind
from safeusb.host.parsers import parse_maps_devices, parse_maps_files
from safeusb.host.procfs import ProcessScan, read_comm, scan_processes
from safeusb.host.recording import is_recording
from safeusb.host.roots import Roots

log = logging.getLogger("safeusb")

# A str, not a pathlib.Path: pathlib (and urllib, ipaddress with it) costs the command
# ~6 ms of start-up, and nothing else on the inspect path imports it.
OBJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "bpf",
                      "scan.bpf.o")
PROGRAMS = ("scan_dirs", "scan_files", "scan_maps")  # read for a device's uses
# scan_maps in two halves, side by side (Linux >= 6.7), where they loaded
HALVES = ("scan_maps_even", "scan_maps_odd")
NS_PROGRAM = "scan_ns"  # every process's mount namespace
# what is looked for: device numbers (devs), and in the terms of the halves' summaries of
# what each process maps (wants)
MAPS = ("devs", "wants")
ENV = "SAFEUSB_SCAN"
PIN_ROOT = "/sys/fs/bpf"
PIN_PREFIX = "safeusb-scan-"

# struct scan_rec in bpf/scan.bpf.c
_REC = struct.Struct("<IIiIIIIIQQ")
_FD, _CWD, _ROOT, _MMAP, _MNTNS, _MAPS_UNREAD = 1, 2, 3, 4, 5, 6
_REC_STAT = 1
_DEV_FS, _DEV_BLOCK, _DEV_CHAR = 1, 2, 4
_MAPS_BLOCK, _MAPS_CHAR = 1, 2
_WANT = struct.Struct("<QII")  # struct want: fs bits, MAPS_ bits, set
_KIND: dict[int, UseKind] = {_CWD: "cwd", _ROOT: "root"}


class Unavailable(Exception):
    """The in-kernel scan cannot run here; the message says why."""


def _kdev(d: DevNum) -> int:
    """The kernel's encoding of a device number (dev_t inside the kernel)."""
    return (d[0] << 20) | d[1]


def _from_kdev(v: int) -> DevNum:
    return v >> 20, v & 0xFFFFF


def _fs_bit(kdev: int) -> int:
    """A filesystem's bit in the halves' summaries (fs_bit() in scan.bpf.c)."""
    return 1 << (((kdev * 2654435761) & 0xFFFFFFFF) >> 26)


def _want(devs: dict[int, int]) -> bytes:
    """struct want for the device numbers: what a process's summary must show for its
    mappings to be walked again."""
    fs = nodes = 0
    for dev, bits in devs.items():
        if bits & _DEV_FS:
            fs |= _fs_bit(dev)
        if bits & _DEV_BLOCK:
            nodes |= _MAPS_BLOCK
        if bits & _DEV_CHAR:
            nodes |= _MAPS_CHAR
    return _WANT.pack(fs, nodes, 1)


def unavailable(roots: Roots) -> str | None:
    """Why the in-kernel scan cannot run for these roots, or None when it may."""
    if not roots.own_kernel or is_recording(roots):
        return "not the live system's /proc (a recording is read through its own)"
    if os.geteuid() != 0:
        return "not root (BPF iterators need CAP_BPF and CAP_PERFMON)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "the kernel has no BTF (/sys/kernel/btf/vmlinux: CONFIG_DEBUG_INFO_BTF)"
    if not os.path.exists(OBJECT):
        return f"the scan's BPF object is not built ({OBJECT}; scripts/build-bpf)"
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            nspid = next((ln.split()[1:] for ln in f if ln.startswith("NSpid:")), None)
    except OSError as exc:
        return f"cannot tell the pid namespace (/proc/self/status: {exc.strerror})"
    if nspid is None or len(nspid) != 1:
        return ("not in the initial pid namespace (the iterators report the kernel's "
                "process ids)")
    return None


def _pin_dir(obj_path: str) -> str:
    """Where this build of the object stays loaded: a new build gets a new directory."""
    st = os.stat(obj_path)
    return f"{PIN_ROOT}/{PIN_PREFIX}{st.st_size:x}-{st.st_mtime_ns:x}"


def _load(obj_path: str, pin_dir: str) -> None:
    """Load the iterator programs and pin their links and the device map in pin_dir
    (made whole under a temporary name, then renamed: a concurrent load loses the rename
    and removes its own)."""
    lib = libbpf().lib
    bpffs()
    tmp = f"{pin_dir}-tmp{os.getpid()}"  # bpffs refuses names with a dot
    _remove(tmp)  # left by a load that died, or made by someone else
    os.mkdir(tmp, 0o700)
    quiet = lib.libbpf_set_print(None)  # its log would go to our stderr
    obj = None
    try:
        # The halves' open-coded iterator needs Linux >= 6.7: without it, the rest.
        for programs in ((*PROGRAMS, NS_PROGRAM, *HALVES), (*PROGRAMS, NS_PROGRAM)):
            if obj:
                lib.bpf_object__close(obj)
            obj = lib.bpf_object__open_file(obj_path.encode(), None)
            if not obj:
                raise Unavailable(str(libbpf().err(f"cannot open {obj_path}")))
            for name in HALVES:
                if name not in programs:
                    lib.bpf_program__set_autoload(
                        lib.bpf_object__find_program_by_name(obj, name.encode()), False)
            rc = lib.bpf_object__load(obj)
            if not rc:
                break
        if rc:
            raise Unavailable(str(libbpf().err(
                "the kernel refused the iterator programs (BPF iterators need Linux >= 5.12 "
                "with BTF)", rc)))
        for name in MAPS:
            rc = lib.bpf_map__pin(lib.bpf_object__find_map_by_name(obj, name.encode()),
                                  f"{tmp}/{name}".encode())
            if rc:
                raise Unavailable(str(libbpf().err(f"cannot pin the scan's map {name}", rc)))
        for name in programs:
            prog = lib.bpf_object__find_program_by_name(obj, name.encode())
            link = lib.bpf_program__attach_iter(prog, None) if prog else None
            if not link:
                raise Unavailable(str(libbpf().err(f"cannot attach the iterator {name}")))
            rc = lib.bpf_link__pin(link, f"{tmp}/{name}".encode())
            lib.bpf_link__destroy(link)  # the pin keeps it
            if rc:
                raise Unavailable(str(libbpf().err(f"cannot pin the iterator {name}", rc)))
        try:
            os.rename(tmp, pin_dir)
        except OSError:
            if not os.path.isdir(pin_dir):
                raise
    finally:
        if obj:
            lib.bpf_object__close(obj)
        lib.libbpf_set_print(quiet)
        _remove(tmp)
    # Older builds' pins are of no further use.
    for name in os.listdir(PIN_ROOT):
        if name.startswith(PIN_PREFIX) and f"{PIN_ROOT}/{name}" != pin_dir \
                and "-tmp" not in name:
            _remove(f"{PIN_ROOT}/{name}")


def _lib() -> Any:
    try:
        return libbpf().lib
    except BPFError as exc:
        raise Unavailable(str(exc)) from None


def _ready(obj_path: str) -> str:
    """The pinned directory of this build, loaded first if it is not there. /sys/fs/bpf
    is writable by everyone (sticky, like /tmp): a directory of that name that is not
    root's own, mode 0700, is removed (or, if it cannot be, refused) and never used."""
    try:
        pin_dir = _pin_dir(obj_path)
        for _ in range(3):  # remove a stranger's, load, check
            try:
                st = os.lstat(pin_dir)
            except FileNotFoundError:
                _load(obj_path, pin_dir)
                continue
            if _owned(st):
                return pin_dir
            _remove(pin_dir)
            if os.path.lexists(pin_dir):
                break
    except (BPFError, OSError) as exc:
        raise Unavailable(str(exc)) from None
    raise Unavailable(f"{pin_dir} is not root's own, and cannot be removed")


def _owned(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _pins(roots: Roots) -> str:
    """The pinned directory of the scan's build, where the in-kernel scan may run (else
    Unavailable). A long-lived reader (safeusbd) keeps it in ``roots`` and checks it again
    with one lstat: a newer build's load removes it, and then everything is checked anew."""
    kept = roots.kept.get("bpfscan")
    if kept is not None:
        with contextlib.suppress(OSError):
            if _owned(os.lstat(kept)):
                return str(kept)
    why = unavailable(roots)
    if why is not None:
        raise Unavailable(why)
    pin_dir = _ready(OBJECT)
    roots.kept["bpfscan"] = pin_dir
    return pin_dir


def _remove(path: str) -> None:
    """Remove a pinned directory and what is pinned in it; never through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:  # not a directory (a symlink, a pinned object): only the name goes
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    try:
        for name in os.listdir(fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def unload() -> bool:
    """Remove every pinned build of the scan; True when there was one."""
    found = False
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(PIN_ROOT):
            if name.startswith(PIN_PREFIX):
                _remove(f"{PIN_ROOT}/{name}")
                found = True
    return found


def read_records(devs: dict[int, int], obj_path: str = OBJECT,
                 programs: tuple[str, ...] = PROGRAMS, pin_dir: str | None = None) -> bytes:
    """Run the iterator programs for the device numbers (kernel encoding -> DEV_ bits)
    and read what each writes out. The programs are loaded once and stay pinned under
    /sys/fs/bpf (loading costs more than a scan); a scan holds an exclusive lock on their
    directory while it sets the device map. Raises Unavailable with the reason."""
    lib = _lib()
    pin_dir = pin_dir or _ready(obj_path)
    try:
        dfd = os.open(pin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise Unavailable(str(exc)) from None
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        mfd = _pinned(pin_dir, "devs")
        try:
            wfd = _pinned(pin_dir, "wants")
        except Unavailable:
            os.close(mfd)
            raise
        try:
            key, nxt = ctypes.c_uint32(0), ctypes.c_uint32(0)
            while lib.bpf_map_get_next_key(mfd, None, ctypes.byref(nxt)) == 0:
                if lib.bpf_map_delete_elem(mfd, ctypes.byref(nxt)):
                    raise Unavailable(str(libbpf().err("cannot clear the scan's device map")))
            for dev, bits in devs.items():
                key, val = ctypes.c_uint32(dev), ctypes.c_uint32(bits)
                if lib.bpf_map_update_elem(mfd, ctypes.byref(key), ctypes.byref(val), 0):
                    raise Unavailable(str(libbpf().err("cannot fill the scan's device map")))
            want = ctypes.create_string_buffer(_want(devs), _WANT.size)
            if lib.bpf_map_update_elem(wfd, ctypes.byref(ctypes.c_uint32(0)), want, 0):
                raise Unavailable(str(libbpf().err("cannot set what the scan looks for")))
            return _run_all(pin_dir, programs)
        finally:
            os.close(mfd)
            os.close(wfd)
    finally:
        os.close(dfd)  # and the lock with it


def _pinned(pin_dir: str, name: str) -> int:
    """A descriptor of one of the scan's pinned maps or iterator links."""
    fd: int = libbpf().lib.bpf_obj_get(f"{pin_dir}/{name}".encode())
    if fd < 0:
        why = str(libbpf().err(f"cannot open {pin_dir}/{name}", fd))
        _remove(pin_dir)  # broken: the next scan loads it again
        raise Unavailable(why)
    return fd


def _run_all(pin_dir: str, programs: tuple[str, ...]) -> bytes:
    """What the programs write out. The mappings' walk, the longest by far (every mapping
    of every process), runs beside the others in threads of its own, in two halves where
    the kernel has them: a read of an iterator runs in the kernel, outside the
    interpreter's lock."""
    if "scan_maps" not in programs:
        return b"".join(_run(pin_dir, name) for name in programs)
    walks = HALVES if os.path.exists(f"{pin_dir}/{HALVES[0]}") else ("scan_maps",)
    others = [name for name in programs if name != "scan_maps"]
    out: dict[str, bytes] = {}
    failed: list[Unavailable] = []

    def walk(name: str) -> None:
        try:
            out[name] = _run(pin_dir, name)
        except Unavailable as exc:
            failed.append(exc)

    walkers = [threading.Thread(target=walk, args=(name,), name=f"safeusb-{name}",
                                daemon=True) for name in walks]
    for t in walkers:
        t.start()
    try:
        for name in others:
            out[name] = _run(pin_dir, name)
    finally:
        for t in walkers:
            t.join()
    if failed:
        raise failed[0]
    return b"".join(out[name] for name in (*others, *walks))


def _run(pin_dir: str, name: str) -> bytes:
    """Everything one pinned iterator writes out."""
    lib = libbpf().lib
    lfd = _pinned(pin_dir, name)
    try:
        fd = lib.bpf_iter_create(lfd)
    finally:
        os.close(lfd)
    if fd < 0:
        raise Unavailable(str(libbpf().err(f"cannot create the iterator {name}", fd)))
    out: list[bytes] = []
    try:
        while chunk := os.read(fd, 1 << 20):
            out.append(chunk)
    except OSError as exc:
        raise Unavailable(f"reading the iterator {name}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(out)


def mount_namespaces(obj_path: str = OBJECT, pin_dir: str | None = None) -> dict[int, int]:
    """Every process's mount namespace (pid -> inode number), as /proc/PID/ns/mnt names
    it, in one pass. Raises Unavailable."""
    data = _run(pin_dir or _ready(obj_path), NS_PROGRAM)
    return {r[1]: r[8] for r in _REC.iter_unpack(data) if r[0] == _MNTNS}


def namespaces_of(roots: Roots) -> dict[int, int] | None:
    """mount_namespaces() where the in-kernel scan may run (as scan() decides), else None:
    the /proc scan reads each process's link."""
    if os.environ.get(ENV, "") == "proc":
        return None
    try:
        return mount_namespaces(pin_dir=_pins(roots))
    except Unavailable as exc:
        log.debug("scan: mount namespaces from /proc, not BPF iterators: %s", exc)
        return None


def scan_processes_kernel(
    roots: Roots,
    pids: list[int],
    nodes: frozenset[tuple[NodeKind, DevNum]],
    fs_devnums: frozenset[DevNum],
    skip_pids: frozenset[int] = frozenset(),
) -> ProcessScan:
    """procfs.scan_processes's findings, by the BPF iterators. Raises Unavailable."""
    pin_dir = _pins(roots)
    devs: dict[int, int] = {}
    for d in fs_devnums:
        devs[_kdev(d)] = devs.get(_kdev(d), 0) | _DEV_FS
    for k, d in nodes:
        devs[_kdev(d)] = devs.get(_kdev(d), 0) | (_DEV_BLOCK if k == "block" else _DEV_CHAR)
    # Without a filesystem on the device, a directory cannot be on it: only descriptors
    # and mappings of its nodes can hold it.
    blk = {d for k, d in nodes if k == "block"}
    chrs = {d for k, d in nodes if k == "char"}
    data = read_records(devs, programs=PROGRAMS if fs_devnums else ("scan_files",
                                                                   "scan_maps"),
                        pin_dir=pin_dir)
    wanted = set(pids) - skip_pids
    # per process: descriptors, working and root directory, whether it maps the device
    fds: dict[int, list[tuple[int, int, int, int, int]]] = {}
    dirs: dict[int, list[tuple[int, int, int]]] = {}
    maps: set[int] = set()
    mapped_nodes: dict[int, list[tuple[int, tuple[NodeKind, DevNum]]]] = {}
    unread: set[int] = set()
    for kind, tgid, fd, mode, dev, rdev, flags, _pad, _ino, start in _REC.iter_unpack(data):
        if tgid not in wanted:
            continue
        if kind == _FD:
            fds.setdefault(tgid, []).append((fd, mode, dev, rdev, flags))
        elif kind in _KIND:
            dirs.setdefault(tgid, []).append((kind, dev, flags))
        elif kind == _MMAP:
            if stat.S_ISBLK(mode) and _from_kdev(rdev) in blk:
                mapped_nodes.setdefault(tgid, []).append((start, ("block", _from_kdev(rdev))))
            elif stat.S_ISCHR(mode) and _from_kdev(rdev) in chrs:
                mapped_nodes.setdefault(tgid, []).append((start, ("char", _from_kdev(rdev))))
            else:
                maps.add(tgid)
        elif kind == _MAPS_UNREAD:
            unread.add(tgid)
    # Processes whose mappings the kernel did not walk: what /proc's scan finds in their
    # maps stands in for it.
    by_proc: dict[int, list[ProcessUse]] = {}
    problems: tuple[Unreadable, ...] = ()
    if unread:
        read = scan_processes(roots, sorted(unread), nodes, fs_devnums, skip_pids)
        problems = read.unreadable
        for u in read.uses:
            if u.how == "mmap":
                by_proc.setdefault(u.pid, []).append(u)
    proc = roots.proc
    uses: list[ProcessUse] = []
    for pid in sorted(set(fds) | set(dirs) | maps | set(mapped_nodes) | set(by_proc)):
        base = f"{proc}/{pid}"
        found: list[tuple[UseKind, str, tuple[NodeKind, DevNum] | None, DevNum | None]] = []
        for fd, mode, kdev, krdev, flags in sorted(fds.get(pid, ())):
            link = f"{base}/fd/{fd}"
            # stat tells another filesystem than the record; with none on the device
            # there is nothing to tell (mode and node number are the inode's own)
            if flags & _REC_STAT and fs_devnums:
                try:
                    st = os.stat(link)
                except OSError:
                    continue
                kind = st.st_mode
                fsdev = (os.major(st.st_dev), os.minor(st.st_dev))
                rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                kind, fsdev, rdev = mode, _from_kdev(kdev), _from_kdev(krdev)
            node: tuple[NodeKind, DevNum] | None = None
            fs: DevNum | None = None
            if stat.S_ISBLK(kind) and rdev in blk:
                node = ("block", rdev)
            elif stat.S_ISCHR(kind) and rdev in chrs:
                node = ("char", rdev)
            elif fsdev in fs_devnums:
                fs = fsdev
            else:
                continue
            try:
                target = os.readlink(link)
            except OSError:
                continue
            found.append(("fd", target, node, fs))
        for kind, kdev, flags in sorted(dirs.get(pid, ())):
            if not fs_devnums:
                break  # a directory is on the device only through a filesystem on it
            how = _KIND[kind]
            link = f"{base}/{how}"
            if flags & _REC_STAT:
                try:
                    st = os.stat(link)
                except OSError:
                    continue
                fsdev = (os.major(st.st_dev), os.minor(st.st_dev))
            else:
                fsdev = _from_kdev(kdev)
            if fsdev not in fs_devnums:
                continue
            try:
                path = os.readlink(link)
            except OSError:
                path = "?"
            found.append((how, path, None, fsdev))
        if pid in maps or pid in mapped_nodes:
            try:
                with open(f"{base}/maps", "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                text = ""
            if pid in maps:
                for dev, path in parse_maps_devices(text).items():
                    if dev in fs_devnums:
                        found.append(("mmap", path, None, dev))
            if pid in mapped_nodes:
                found.extend(_mapped_nodes(text, mapped_nodes[pid]))
        found.extend((u.how, u.path, u.node, u.fs) for u in by_proc.get(pid, ()))
        if found:
            comm = read_comm(roots, pid)
            uses.extend(ProcessUse(pid, comm, how, path, node, fs)
                        for how, path, node, fs in found)
    return ProcessScan(tuple(uses), problems)


def _mapped_nodes(text: str, records: list[tuple[int, tuple[NodeKind, DevNum]]]
                  ) -> list[tuple[UseKind, str, tuple[NodeKind, DevNum] | None, DevNum | None]]:
    """Each node the process maps, once, named by its first mapping's path in the maps
    (the mapping at the record's start address)."""
    paths = {m[1]: m[2] for m in parse_maps_files(text)}
    out: list[tuple[UseKind, str, tuple[NodeKind, DevNum] | None, DevNum | None]] = []
    seen: set[tuple[NodeKind, DevNum]] = set()
    for start, node in sorted(records):
        if node in seen:
            continue
        seen.add(node)
        out.append(("mmap", paths.get(start, "?"), node, None))
    return out


def scan(
    roots: Roots,
    pids: list[int],
    nodes: frozenset[tuple[NodeKind, DevNum]],
    fs_devnums: frozenset[DevNum],
    skip_pids: frozenset[int] = frozenset(),
    kernel: bool = True,
) -> tuple[ProcessScan, str | None]:
    """What processes hold on the device: in the kernel where it can (and ``kernel``),
    else through /proc. Returns the scan and, when /proc was read, why the in-kernel scan
    was not used."""
    choice = os.environ.get(ENV, "")
    if not kernel:
        why: str | None = "the caller reads /proc only"
    elif choice == "proc":
        why = f"{ENV}=proc"
    else:
        try:
            return scan_processes_kernel(roots, pids, nodes, fs_devnums, skip_pids), None
        except Unavailable as exc:
            if choice == "kernel":
                raise BPFError(f"the in-kernel scan cannot run: {exc}") from None
            why = str(exc)
    log.debug("scan: reading /proc, not BPF iterators: %s", why)
    return scan_processes(roots, pids, nodes, fs_devnums, skip_pids), why
