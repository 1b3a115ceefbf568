"""Reading procfs: mount namespaces, swaps and what processes hold open."""

from __future__ import annotations

import errno
import marshal
import os
import stat
import struct
import threading
from collections.abc import Iterable, Iterator

from safeusb.host.model import DevNum, MountNamespace, NodeKind, ProcessUse, Unreadable, UseKind
from safeusb.host.parsers import (
    ParseError,
    parse_maps_dev_nodes,
    parse_maps_devices,
    parse_mountinfo,
    parse_ns_link,
    parse_swaps,
)
from safeusb.host.recording import RecordedStat, Stater, is_recording
from safeusb.host.roots import PROC, Roots
from safeusb.values import frozen

_GONE = (errno.ENOENT, errno.ESRCH)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_S_IFMT, _S_IFBLK, _S_IFCHR = 0o170000, stat.S_IFBLK, stat.S_IFCHR
_DIRS: tuple[UseKind, ...] = ("cwd", "root")


def list_pids(roots: Roots) -> list[int]:
    return sorted(int(n) for n in os.listdir(roots.proc) if n.isdigit())


def read_comm(roots: Roots, pid: int) -> str:
    try:
        with open(roots.proc_path(str(pid), "comm"), encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def any_running(roots: Roots, commands: tuple[str, ...]) -> bool:
    """Whether a process runs one of ``commands`` (by its comm)."""
    try:
        pids = list_pids(roots)
    except OSError:
        return False
    return any(read_comm(roots, pid) in commands for pid in pids)


@frozen
class NamespaceScan:
    namespaces: tuple[MountNamespace, ...]
    unreadable: tuple[Unreadable, ...]


def read_mount_namespaces(roots: Roots, pids: Iterable[int],
                          ns_of: dict[int, int] | None = None) -> NamespaceScan:
    """Every mount namespace that has a process, with its mount table, read once each.
    ``ns_of`` (pid -> namespace inode, from the in-kernel scan) replaces reading each
    process's /proc/PID/ns/mnt; a pid it lacks has gone. Only the process whose mount
    table is read has its link read, so that a namespace is read through the same process
    as without ``ns_of``: one whose link is denied is tried no further."""
    members: dict[int, list[int]] = {}
    problems: list[Unreadable] = []
    denied: list[int] = []
    proc = roots.proc
    seen: dict[str, int] = {}  # link text -> inode: most processes share a few namespaces
    for pid in pids:
        if ns_of is not None:
            inode = ns_of.get(pid)
            if inode is None:
                continue
            found = members.get(inode)
            if found is None:
                members[inode] = [pid]
            else:
                found.append(pid)
            continue
        try:
            link = os.readlink(f"{proc}/{pid}/ns/mnt")
        except OSError as exc:
            if exc.errno in _GONE:
                continue
            if exc.errno == errno.EACCES:
                denied.append(pid)
                continue
            problems.append(Unreadable(f"mount namespace of pid {pid}", str(exc)))
            continue
        inode = seen.get(link)
        if inode is None:
            try:
                inode = seen[link] = parse_ns_link(link)
            except ParseError as exc:
                problems.append(Unreadable(f"mount namespace of pid {pid}", str(exc)))
                continue
        found = members.get(inode)
        if found is None:
            members[inode] = [pid]
        else:
            found.append(pid)
    namespaces = []
    for inode, pids_in in sorted(members.items()):
        for pid in pids_in:
            if ns_of is not None and not _same_namespace(proc, pid, inode, denied):
                continue
            path = roots.proc_path(str(pid), "mountinfo")
            try:
                with open(path, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                problems.append(Unreadable(f"mounts of namespace {inode} ({path})", str(exc)))
                break
            try:
                mounts = roots.memo.parse(("mountinfo", inode), text, parse_mountinfo)
            except ParseError as exc:
                problems.append(Unreadable(f"mounts of namespace {inode} ({path})", str(exc)))
                break
            namespaces.append(MountNamespace(inode, pid, read_comm(roots, pid), mounts))
            break
    # Where the namespace link is denied (a process of another security domain), its mount
    # table may still be readable: mount ids are unique across namespaces, so a table whose
    # ids are already known belongs to a namespace already read.
    known_ids = {m.mount_id for ns in namespaces for m in ns.mounts}
    unreadable_pids = []
    for pid in sorted(denied) if ns_of is not None else denied:
        try:
            with open(roots.proc_path(str(pid), "mountinfo"), encoding="utf-8",
                      errors="surrogateescape") as f:
                mounts = parse_mountinfo(f.read())
        except OSError as exc:
            if exc.errno not in _GONE:
                unreadable_pids.append(pid)
            continue
        except ParseError:
            unreadable_pids.append(pid)
            continue
        if mounts and mounts[0].mount_id not in known_ids:
            namespaces.append(MountNamespace(0, pid, read_comm(roots, pid), mounts))
            known_ids.update(m.mount_id for m in mounts)
    if unreadable_pids:
        sample = ", ".join(str(p) for p in unreadable_pids[:5])
        problems.append(
            Unreadable(f"the mount namespace of pids {sample}", "permission denied (run as root)")
        )
    roots.memo.keep(("mountinfo", ns.inode) for ns in namespaces if ns.inode)
    # A namespace kept alive by a bind mount of its nsfs file has no process to read it from.
    known = {ns.inode for ns in namespaces} | set(members)
    for ns in namespaces:
        for m in ns.mounts:
            if m.fstype == "nsfs" and m.root.startswith("mnt:["):
                try:
                    inode = parse_ns_link(m.root)
                except ParseError:
                    continue
                if inode not in known:
                    known.add(inode)
                    problems.append(
                        Unreadable(
                            f"mount namespace {inode} (pinned at {m.mountpoint}, no process)",
                            "its mounts cannot be read",
                        )
                    )
    return NamespaceScan(tuple(namespaces), tuple(problems))


def _same_namespace(proc: str, pid: int, inode: int, denied: list[int]) -> bool:
    """Is /proc/PID/ns/mnt readable, and the namespace the kernel said? A pid whose link
    is denied goes to ``denied``, as when every link is read."""
    try:
        link = os.readlink(f"{proc}/{pid}/ns/mnt")
    except OSError as exc:
        if exc.errno == errno.EACCES:
            denied.append(pid)
        return False
    return link == f"mnt:[{inode}]"


def read_swaps(roots: Roots) -> tuple[tuple[str, str, int, int], ...]:
    with open(roots.proc_path("swaps"), encoding="utf-8", errors="surrogateescape") as f:
        return parse_swaps(f.read())


@frozen
class ProcessScan:
    uses: tuple[ProcessUse, ...]
    unreadable: tuple[Unreadable, ...]


def _read_bytes(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)




SHARE_FROM = 200  # processes: below, forking a reader costs more than it saves
_CHUNK = struct.Struct("=I")


def scan_processes(
    roots: Roots,
    pids: Iterable[int],
    nodes: frozenset[tuple[NodeKind, DevNum]],
    fs_devnums: frozenset[DevNum],
    skip_pids: frozenset[int] = frozenset(),
    share_from: int | None = None,
) -> ProcessScan:
    """Find processes holding the given device nodes, or files on the given filesystems,
    through open descriptors, working directory, root directory or memory maps (which
    include the executable). From ``share_from`` processes on, a single-threaded caller
    with more than one CPU shares the reading with a forked child (SharedScan)."""
    return start_scan(roots, pids, nodes, fs_devnums, skip_pids, share_from).result()


def start_scan(
    roots: Roots,
    pids: Iterable[int],
    nodes: frozenset[tuple[NodeKind, DevNum]],
    fs_devnums: frozenset[DevNum],
    skip_pids: frozenset[int] = frozenset(),
    share_from: int | None = None,
) -> SharedScan:
    """scan_processes, begun: where the reading is shared, the child starts reading now
    and this process joins in at result(); otherwise all of it is read at result().
    ``share_from`` defaults to SHARE_FROM."""
    todo = [p for p in pids if p not in skip_pids]
    scanner = _Scanner(roots, nodes, fs_devnums)
    shared = SharedScan(scanner, todo)
    if len(todo) >= (SHARE_FROM if share_from is None else share_from) \
            and scanner.recorded is None \
            and threading.active_count() == 1 and _cpus() > 1:
        shared.fork()
    return shared


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return 1


class SharedScan:
    """A /proc scan shared by this process and a forked child. The processes are cut into
    chunks whose numbers wait in a pipe; each reader takes the next number from it (a
    4-byte read from a pipe is taken whole by one reader), so the child reads from the
    moment it is forked and this process joins in once it has done its other work, and
    neither waits for the other. The child sends back its findings and the chunks it read
    (marshal: plain tuples); a chunk that neither reported is read here, so a child that
    failed in any way leaves nothing taken as free. The reads are system calls into procfs
    that keep one CPU busy each, and threads would take turns at the interpreter's lock.
    Forked only from a single-threaded process (forking one with threads could copy a
    lock held)."""

    def __init__(self, scanner: _Scanner, pids: list[int]) -> None:
        self.scanner = scanner
        self.pids = pids
        size = max(16, -(-len(pids) // 4096))
        self.chunks = [pids[i:i + size] for i in range(0, len(pids), size)]
        self.child = 0
        self.queue = self.results = -1

    def fork(self) -> None:
        """Start the child; on any failure to, all is read here at result()."""
        try:
            queue_r, queue_w = os.pipe()
        except OSError:
            return
        try:
            # All the numbers are written before anyone reads: at most 16 KiB, within a
            # pipe's buffer; the writing end is closed, so an empty queue reads as EOF.
            os.write(queue_w, b"".join(_CHUNK.pack(i) for i in range(len(self.chunks))))
            results_r, results_w = os.pipe()
        except OSError:
            os.close(queue_r)
            return
        finally:
            os.close(queue_w)
        try:
            child = os.fork()
        except OSError:
            for fd in (queue_r, results_r, results_w):
                os.close(fd)
            return
        if child == 0:  # pragma: no cover - the child's coverage is not collected
            code = 1
            try:
                os.close(results_r)
                scanner = self.scanner  # a copy: the parent's has found nothing yet
                scanner.skip = os.getpid()  # its fds are the parent's, already left out
                done = self._take(queue_r)
                data = marshal.dumps((
                    done,
                    [(u.pid, u.comm, u.how, u.path, u.node, u.fs) for u in scanner.uses],
                    [(p.what, p.error) for p in scanner.problems], scanner.denied))
                view = memoryview(data)
                while view:
                    view = view[os.write(results_w, view):]
                code = 0
            finally:
                os._exit(code)
        os.close(results_w)
        self.child, self.queue, self.results = child, queue_r, results_r
        self.scanner.skip = child  # a pid of the list reused by the child: it holds our fds

    def _take(self, queue: int) -> list[int]:
        """Read chunks taken from the queue until it is empty; their numbers."""
        done = []
        while len(data := os.read(queue, _CHUNK.size)) == _CHUNK.size:
            (i,) = _CHUNK.unpack(data)
            self.scanner.scan(self.chunks[i])
            done.append(i)
        return done

    def _join(self, take: bool) -> tuple[set[int], bytes, int]:
        """Take the chunks left (or, not ``take``, drop them), then wait for the child:
        the chunks read here, what the child sent, its exit status."""
        mine: set[int] = set()
        chunks: list[bytes] = []
        status = -1
        try:
            if take:
                mine = set(self._take(self.queue))
            else:
                while os.read(self.queue, 65536):
                    pass
        finally:
            os.close(self.queue)
            try:
                while chunk := os.read(self.results, 1 << 20):
                    chunks.append(chunk)
            except OSError:
                chunks = []
            finally:
                os.close(self.results)
                _pid, status = os.waitpid(self.child, 0)
                self.child = 0
        return mine, b"".join(chunks), status

    def result(self) -> ProcessScan:
        """All the findings: this process's, the child's, and those of chunks read here
        again because the child did not report them."""
        scanner = self.scanner
        if not self.child:
            scanner.scan(self.pids)
        else:
            count = len(self.chunks)
            mine, data, status = self._join(take=True)
            theirs: list[int] = []
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                try:
                    # our own child's, through a pipe of our own
                    done, uses, problems, denied = marshal.loads(data)  # noqa: S302
                    found = [ProcessUse(*u) for u in uses]
                    unread = [Unreadable(*p) for p in problems]
                except (EOFError, ValueError, TypeError):
                    pass
                else:
                    theirs = done
                    scanner.uses.extend(found)
                    scanner.problems.extend(unread)
                    scanner.denied.extend(denied)
            for i in sorted(set(range(count)) - mine - set(theirs)):
                scanner.scan(self.chunks[i])
        problems = list(scanner.problems)
        if scanner.denied:
            denied = sorted(scanner.denied)
            sample = ", ".join(str(p) for p in denied[:5])
            problems.append(
                Unreadable(
                    f"open files of {len(denied)} processes (pids {sample})",
                    "permission denied (run as root)",
                )
            )
        uses = sorted(scanner.uses, key=lambda u: u.pid)
        return ProcessScan(tuple(uses), tuple(problems))

    def discard(self) -> None:
        """Stop sharing and wait for the child: its findings are not wanted."""
        if self.child:
            self._join(take=False)


def _mapped_file(base: str, span: str, path: str, dev: int, ino: int) -> os.stat_result:
    """stat() of a mapped file: through map_files (which needs CAP_SYS_ADMIN), else by its
    path in the process's root, when that is still the mapped file (the same st_dev and
    inode number as the maps line)."""
    try:
        return os.stat(f"{base}/map_files/{span}")
    except PermissionError as denied:
        try:
            st = os.stat(f"{base}/root{path}")
        except OSError:
            raise denied from None
        if (st.st_dev, st.st_ino) != (dev, ino):
            raise denied from None
        return st


class _Scanner:
    def __init__(
        self,
        roots: Roots,
        nodes: frozenset[tuple[NodeKind, DevNum]],
        fs_devnums: frozenset[DevNum],
    ) -> None:
        self.roots = roots
        self.fs = fs_devnums
        self.fs_raw = {os.makedev(*d): d for d in fs_devnums}
        self.blk_raw = {os.makedev(*d): d for k, d in nodes if k == "block"}
        self.chr_raw = {os.makedev(*d): d for k, d in nodes if k == "char"}
        # The dev field of /proc/PID/maps, as the kernel prints it ("%02x:%02x").
        self.maps_keys = [f" {d[0]:02x}:{d[1]:02x} ".encode() for d in fs_devnums]
        self.uses: list[ProcessUse] = []
        self.recorded = Stater(roots) if is_recording(roots) else None
        self.denied: list[int] = []
        self.problems: list[Unreadable] = []
        self.skip = 0  # a forked reader's pid: never one of the host's processes

    def _stat_link(self, pid: int, link: str, dir_fd: int | None = None
                   ) -> os.stat_result | RecordedStat:
        if self.recorded is None:
            return os.stat(link, dir_fd=dir_fd)
        found = self.recorded.stat(pid, os.readlink(link, dir_fd=dir_fd))
        if found is None:
            raise FileNotFoundError(link)
        return found

    def _mapped_nodes(self, pid: int, base: str, data: bytes
                      ) -> list[tuple[UseKind, str, tuple[NodeKind, DevNum] | None, None]]:
        """The device's nodes the process maps (a mapping holds the device open after its
        descriptor is closed), each once, by the first mapping's path. Only files under
        /dev/ are looked at: the mapped file itself is stat()ed through map_files."""
        out: list[tuple[UseKind, str, tuple[NodeKind, DevNum] | None, None]] = []
        seen: set[tuple[NodeKind, DevNum]] = set()
        for span, _start, path, dev, ino in parse_maps_dev_nodes(
                data.decode("utf-8", "replace")):
            st: os.stat_result | RecordedStat | None
            if self.recorded is not None:
                st = self.recorded.stat(pid, path)
            else:
                try:
                    st = _mapped_file(base, span, path, dev, ino)
                except OSError as exc:
                    if exc.errno not in _GONE:
                        self.problems.append(Unreadable(f"mapping {path} of pid {pid}",
                                                        str(exc)))
                    continue
            if st is None:
                continue
            kind = st.st_mode & _S_IFMT
            node: tuple[NodeKind, DevNum] | None = None
            if kind == _S_IFBLK and st.st_rdev in self.blk_raw:
                node = ("block", self.blk_raw[st.st_rdev])
            elif kind == _S_IFCHR and st.st_rdev in self.chr_raw:
                node = ("char", self.chr_raw[st.st_rdev])
            if node is not None and node not in seen:
                seen.add(node)
                out.append(("mmap", path, node, None))
        return out

    def scan(self, pids: list[int]) -> None:
        """One look at each process: a stat of each descriptor, working and root directory
        (sorted by st_dev/st_rdev against plain dicts before any path is read), and its
        maps only where they name one of the filesystems. Names are read for matches only."""
        proc = self.roots.proc
        blk, chrs, fs_raw = self.blk_raw, self.chr_raw, self.fs_raw
        maps_keys = self.maps_keys
        live = self.recorded is None
        stat_link = self._stat_link
        for pid in pids:
            if pid == self.skip:
                continue
            base = f"{proc}/{pid}"
            found: list[tuple[UseKind, str, tuple[NodeKind, DevNum] | None, DevNum | None]] = []
            try:
                dfd = os.open(f"{base}/fd", _DIR_FLAGS)
            except OSError as exc:
                if exc.errno == errno.EACCES:
                    self.denied.append(pid)
                elif exc.errno not in _GONE:
                    self.problems.append(Unreadable(f"open files of pid {pid}", str(exc)))
                continue
            try:
                for name in os.listdir(dfd):
                    try:
                        st = os.stat(name, dir_fd=dfd) if live else stat_link(pid, name, dfd)
                    except OSError:
                        continue  # closed meanwhile
                    node: tuple[NodeKind, DevNum] | None = None
                    fs: DevNum | None = None
                    kind = st.st_mode & _S_IFMT
                    if kind == _S_IFBLK and st.st_rdev in blk:
                        node = ("block", blk[st.st_rdev])
                    elif kind == _S_IFCHR and st.st_rdev in chrs:
                        node = ("char", chrs[st.st_rdev])
                    else:
                        fs = fs_raw.get(st.st_dev)
                        if fs is None:
                            continue
                    try:
                        target = os.readlink(name, dir_fd=dfd)
                    except OSError:
                        continue
                    found.append(("fd", target, node, fs))
            except OSError as exc:
                if exc.errno not in _GONE:
                    self.problems.append(Unreadable(f"open files of pid {pid}", str(exc)))
                continue
            finally:
                os.close(dfd)
            for how in _DIRS if fs_raw else ():  # on the device through a filesystem only
                link = f"{base}/{how}"
                try:
                    st = os.stat(link) if live else stat_link(pid, link)
                except OSError:
                    continue  # kernel threads and zombies have none
                fs = fs_raw.get(st.st_dev)
                if fs is not None:
                    try:
                        path = os.readlink(link)
                    except OSError:
                        path = "?"
                    found.append((how, path, None, fs))
            if maps_keys or blk or chrs:
                data = _read_bytes(f"{base}/maps")
                if data and any(key in data for key in maps_keys):
                    for dev, path in parse_maps_devices(data.decode("utf-8", "replace")).items():
                        if dev in self.fs:
                            found.append(("mmap", path, None, dev))
                if data and (blk or chrs) and b" /dev/" in data:
                    found.extend(self._mapped_nodes(pid, base, data))
            if found:
                comm = read_comm(self.roots, pid)
                for how, path, node, fs in found:
                    self.uses.append(ProcessUse(pid, comm, how, path, node, fs))


def descriptor_stats(roots: Roots, pid: int) -> Iterator[tuple[str, os.stat_result]]:
    """Each open descriptor of ``pid`` that can be stat()ed: its path under /proc and what
    it refers to (nothing when the process is gone or its table cannot be read)."""
    fd_dir = roots.proc_path(str(pid), "fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return
    for fd in fds:
        path = os.path.join(fd_dir, fd)
        try:
            yield path, os.stat(path)
        except OSError:
            continue


def node_holders(roots: Roots, dev: str) -> list[tuple[int, str]]:
    """Processes with a descriptor open on the character device ``dev`` ("189:130"), as
    (pid, comm): every descriptor of every process, by device number."""
    try:
        major, minor = (int(x) for x in dev.split(":"))
    except ValueError:
        return []
    want = os.makedev(major, minor)
    try:
        pids = list_pids(roots)
    except OSError:
        return []
    return [(pid, read_comm(roots, pid)) for pid in pids
            if any(stat.S_ISCHR(st.st_mode) and st.st_rdev == want
                   for _, st in descriptor_stats(roots, pid))]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def pidfd_pid(pidfd: int, proc: str = PROC) -> int | None:
    """The pid a pidfd of this process refers to while that process lives; None once it
    has exited."""
    try:
        with open(os.path.join(proc, "self", "fdinfo", str(pidfd)), encoding="ascii") as f:
            for line in f:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_cgroup(pid: int, proc: str = PROC) -> str | None:
    """/proc/PID/cgroup (at most 1 MiB of it); None once the process is gone."""
    try:
        with open(os.path.join(proc, str(pid), "cgroup"), encoding="utf-8") as f:
            return f.read(1024 * 1024)
    except OSError:
        return None


def process_start_ticks(pid: int, proc: str = PROC) -> int | None:
    """/proc/PID/stat's starttime (clock ticks since boot), None once the process is gone."""
    try:
        with open(os.path.join(proc, str(pid), "stat"), encoding="utf-8",
                  errors="replace") as f:
            text = f.read()
        return int(text.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
