"""The one place that changes the system. Every action and command is logged (stderr and
syslog); commands are argument lists with absolute paths, never a shell."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from safeusb.errors import SafeUSBError
from safeusb.host.parsers import ParseError, parse_bdi_stats, parse_mountinfo
from safeusb.host.procfs import read_comm
from safeusb.host.roots import Roots


# What the runner reads of the two steps that hand it their data whole (steps.Flush,
# steps.DownLink): the steps call the runner, the runner never knows the steps.
class FlushOrder(Protocol):
    @property
    def device(self) -> str: ...
    @property
    def bdi(self) -> str: ...
    @property
    def dirty_bytes(self) -> int: ...
    @property
    def filesystems(self) -> tuple[tuple[int, str], ...]: ...
    @property
    def nodes(self) -> tuple[str, ...]: ...


class LinkRecord(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def mac(self) -> str: ...
    @property
    def port(self) -> str: ...
    @property
    def netns(self) -> int: ...
    @property
    def netns_path(self) -> str: ...
    @property
    def netns_where(self) -> str: ...
    @property
    def up(self) -> bool: ...
    @property
    def master(self) -> str | None: ...
    @property
    def addresses(self) -> tuple[tuple[int, str, int], ...]: ...
    @property
    def routes(self) -> tuple[tuple[int, str, str | None, int], ...]: ...
    @property
    def parent(self) -> str: ...

log = logging.getLogger("safeusb")

_TOOL_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
_CLONE_NEWNS = 0x00020000


class StepFailed(SafeUSBError):
    """A step of a plan could not be carried out."""

    exit_code = 1


class FlushTimeout(StepFailed):
    pass


class SyscallFailed(StepFailed):
    """A system call made for a step failed with errno."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class NothingToDo(SafeUSBError):
    """A step found what it would change already gone (a mount unmounted meanwhile by its
    owner or by propagation): nothing was done, and nothing is to be put back."""


class Cancelled(StepFailed):
    """Whoever asked for the handover gave up waiting: stop, and undo what was done."""


class DeviceGone(StepFailed):
    """The device left the host while a step worked on it (unplugged, reset)."""


class CommandFailed(StepFailed):
    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {returncode}"
        super().__init__(f"{' '.join(argv)}: {detail}")
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr


def tool(name: str) -> str:
    """Absolute path of a system tool, from fixed directories only (never $PATH)."""
    for d in _TOOL_DIRS:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    raise StepFailed(f"{name} not found in {', '.join(_TOOL_DIRS)}")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@dataclass
class Runner:
    """Executes commands and system calls and logs each one."""

    flush_timeout: float = 120.0
    debugfs: str = "/sys/kernel/debug"
    sys_root: str = "/sys"
    progress: Callable[[str], None] | None = None
    log_lines: list[str] = field(default_factory=list)
    held: dict[str, int] = field(default_factory=dict)
    loops_kept: dict[str, int] = field(default_factory=dict)  # autoclear loops held open
    cancel: threading.Event | None = None  # set: the caller no longer waits for the answer

    @classmethod
    def for_roots(cls, roots: Roots, **kwargs: Any) -> Runner:
        """A runner acting on the system the roots describe."""
        return cls(debugfs=roots.debugfs, sys_root=roots.sys, **kwargs)

    def loop_backing_file(self, node: str) -> str | None:
        """The file loop device ``node`` is backed by now (None: not attached), as the
        snapshot reads it (sysfs._read)."""
        path = os.path.join(self.sys_root, "block", os.path.basename(node), "loop",
                            "backing_file")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StepFailed(f"cannot read {path}: {exc.strerror or exc}") from None

    @staticmethod
    def in_mount_namespace(pid: int, mnt_ns: int) -> bool:
        """Whether process ``pid`` is (still) in mount namespace ``mnt_ns``."""
        try:
            return os.readlink(f"/proc/{pid}/ns/mnt") == f"mnt:[{mnt_ns}]"
        except OSError:
            return False

    @staticmethod
    def seen_by(pid: int, path: str) -> str:
        """``path`` as process ``pid`` sees it (through its root directory), for a
        command run from here."""
        return f"/proc/{pid}/root{path}"

    def check_cancelled(self, doing: str = "prepare") -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"{doing} was cancelled: the request for the device gave up "
                            "waiting for it")

    def _log(self, text: str) -> None:
        self.log_lines.append(text)
        log.info("%s", text)

    def run(self, argv: Sequence[str], timeout: float | None = 120) -> str:
        if not argv or not os.path.isabs(argv[0]):
            raise ValueError(f"command must start with an absolute path: {argv!r}")
        self._log("run: " + " ".join(argv))
        try:
            proc = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise StepFailed(f"{' '.join(argv)}: no answer in {timeout} s") from None
        if proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stderr)
        return proc.stdout

    def mount_debugfs(self, target: str) -> None:
        self.run([tool("mount"), "-t", "debugfs", "debugfs", target])

    def ensure_debugfs(self, roots: Roots) -> None:
        """Mount debugfs, where the dirty-page figures are, when the live system lacks it
        and this process may mount it. Reading never mounts: a read that finds it missing
        reports the figures as unreadable, which is what a failed mount leaves too."""
        if roots.live and os.geteuid() == 0 \
                and not os.path.isdir(os.path.join(roots.debugfs, "bdi")):
            with contextlib.suppress(StepFailed, OSError):
                self.mount_debugfs(roots.debugfs)

    def write_sysfs(self, path: str, value: str) -> None:
        self._log(f"write {value!r} to {path}")
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write(value)
        except OSError as exc:
            raise StepFailed(f"writing {value!r} to {path}: {exc.strerror or exc}") from None

    # -- processes ---------------------------------------------------------------------

    def kill(self, pid: int, comm: str, grace: float = 5.0, after_kill: float = 5.0) -> None:
        """End a process: SIGTERM, SIGKILL after ``grace``; return once it has exited
        (its files are closed then, even while it waits to be reaped). Through a pidfd,
        so a pid reused meanwhile is never signalled."""
        self._log(f"kill: pid {pid} ({comm}) with SIGTERM, SIGKILL after {grace:g} s")
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._log(f"pid {pid} ({comm}) has exited already")
            return
        try:
            now = read_comm(Roots.host(), pid)  # as the scan that found the process read it
            if now not in ("?", comm):
                self._log(f"pid {pid} is {now} now, not {comm}: left alone")
                return
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            if _exited(pidfd, grace):
                return
            self._log(f"pid {pid} ({comm}) is still there after {grace:g} s: SIGKILL")
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            if not _exited(pidfd, after_kill):
                raise StepFailed(f"pid {pid} ({comm}) did not exit within {after_kill:g} s "
                                 "of SIGKILL (stuck in the kernel)")
        except ProcessLookupError:
            return
        finally:
            os.close(pidfd)

    # -- mount namespaces --------------------------------------------------------------

    def _in_namespace(self, pid: int, action: Callable[[ctypes.CDLL], int], what: str) -> None:
        """Run a system call in the mount namespace and root of pid, in a child process."""
        ns_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        root_fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            child = os.fork()
            if child == 0:  # pragma: no cover - runs in the child
                code = 0
                try:
                    libc = _libc()
                    if libc.setns(ns_fd, _CLONE_NEWNS) != 0:
                        code = 100 + ctypes.get_errno()
                    else:
                        os.fchdir(root_fd)
                        os.chroot(".")
                        if action(libc) != 0:
                            code = ctypes.get_errno() or 99
                finally:
                    os._exit(code)
            _, status = os.waitpid(child, 0)
        finally:
            os.close(ns_fd)
            os.close(root_fd)
        code = os.waitstatus_to_exitcode(status)
        if code >= 100:
            raise StepFailed(f"{what}: cannot enter the mount namespace of pid {pid}: "
                             f"{os.strerror(code - 100)}")
        if code:
            raise SyscallFailed(f"{what}: {os.strerror(code)}", code)

    def _still_mounted(self, pid: int, mountpoint: str) -> bool:
        try:
            with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
                return any(m.mountpoint == mountpoint for m in parse_mountinfo(f.read()))
        except (OSError, ParseError):
            return True

    def umount_in(self, pid: int, mnt_ns: int, mountpoint: str) -> None:
        what = f"umount {mountpoint} in mount namespace {mnt_ns} (pid {pid})"
        self._log(what)
        gone = NothingToDo(f"{mountpoint} in mount namespace {mnt_ns} was unmounted "
                           "meanwhile (by its owner, or by propagation)")
        if not self._still_mounted(pid, mountpoint):
            self._log(str(gone))
            raise gone
        path = mountpoint.encode()
        try:
            self._in_namespace(pid, lambda libc: int(libc.umount2(path, 0)), what)
        except StepFailed as e:
            if not self._still_mounted(pid, mountpoint):  # it went between look and act
                self._log(str(gone))
                raise gone from None
            if isinstance(e, SyscallFailed) and e.errno == errno.EINVAL:
                # Not a mount point when asked, one again now: mounted anew meanwhile.
                raise StepFailed(f"{what}: {mountpoint} was mounted again while prepare ran: "
                                 "claimed by another holder") from None
            raise

    def mount_in(self, pid: int, mnt_ns: int, source: str, mountpoint: str, fstype: str,
                 options: str) -> None:
        what = f"mount {source} at {mountpoint} ({fstype}, {options}) in mount namespace " \
               f"{mnt_ns} (pid {pid})"
        self._log(what)
        flags, data = _mount_flags(options)
        src, mp, fs, opts = source.encode(), mountpoint.encode(), fstype.encode(), data.encode()
        self._in_namespace(
            pid, lambda libc: int(libc.mount(src, mp, fs, ctypes.c_ulong(flags), opts)), what
        )

    # -- flushing ----------------------------------------------------------------------

    def _bdi_remaining(self, bdi: str) -> int | None:
        try:
            with open(os.path.join(self.debugfs, "bdi", bdi, "stats"), encoding="utf-8") as f:
                dirty, writeback = parse_bdi_stats(f.read())
        except (OSError, ParseError):
            return None
        return dirty + writeback

    def _present(self, bdi: str) -> bool:
        return os.path.exists(os.path.join(self.sys_root, "dev/block", bdi))

    def flush(self, step: FlushOrder) -> None:
        """Write back every dirty page of the device: syncfs each filesystem on it and
        fsync its nodes, with progress, until done, the timeout, or the device vanishes.

        The writing runs in `sync` processes, which a flush that outlives its timeout
        leaves behind to finish alone. A device with nothing mounted and nothing dirty
        when it was read (an idle stick) is fsynced by a thread of this process instead:
        the same calls, without starting two programs, which costs more than the flush."""
        targets = [f"/proc/{pid}/root{mp}" for pid, mp in step.filesystems]
        self._log(f"flush {step.device}: syncfs {', '.join(targets) or '-'}; "
                  f"fsync {', '.join(step.nodes)}")
        job: _FlushJob
        if not targets and step.dirty_bytes == 0:
            job = _FsyncThread(step.nodes)
        else:
            sync = tool("sync")
            commands = [[sync, "--file-system", *targets]] if targets else []
            commands.append([sync, *step.nodes])
            for argv in commands:
                self._log("run: " + " ".join(argv))
            job = _SyncProcesses(commands)
        deadline = time.monotonic() + self.flush_timeout
        left: int | None = step.dirty_bytes  # the last reading before it could vanish
        try:
            while job.running():
                if not self._present(step.bdi):
                    raise self._gone(step, left)
                if self.cancel is not None and self.cancel.is_set():
                    self.check_cancelled(f"flushing {step.device} (nothing was unmounted)")
                if time.monotonic() > deadline:
                    left = self._bdi_remaining(step.bdi)
                    shown = "unknown" if left is None else f"{left} bytes"
                    raise FlushTimeout(f"flushing {step.device} did not finish in "
                                       f"{self.flush_timeout:g} s ({shown} still unwritten); "
                                       "nothing was unmounted")
                reading = self._bdi_remaining(step.bdi)
                if reading is not None:
                    left = reading
                    if self.progress:
                        self.progress(f"flushing {step.device}: {left / 1048576:.1f} MiB left")
                job.wait(0.05)  # an idle device's flush ends at once
        finally:
            still = job.stop()
            if still:
                self._log(f"{still} is still waiting in the kernel; left to finish on its own")
        failure = job.failure()
        if failure is not None:
            # A write that failed is most often a device on its way out: the kernel
            # fails its I/O before sysfs lets go of it. Give the removal a moment.
            deadline = time.monotonic() + 2.0
            while self._present(step.bdi) and time.monotonic() < deadline:
                time.sleep(0.05)
        if not self._present(step.bdi):
            if failure is None:
                raise DeviceGone(f"{step.device} was removed from the host just after its "
                                 "flush completed; there is nothing left to hand over")
            raise self._gone(step, left)  # the writes "finished" by failing
        if failure is not None:
            raise failure
        if self.progress:
            self.progress("")

    def _gone(self, step: FlushOrder, left: int | None) -> DeviceGone:
        """The device vanished while its data was being written. The counters are no
        measure of what reached it: failed writes leave them too, so they may read 0 by
        the time the device is gone. Say what was unwritten when the flush began."""
        def mib(n: int) -> str:
            return f"{n / 1048576:.1f} MiB"

        last = "unknown" if left is None else mib(left)
        self._log(f"{step.device} vanished during the flush; last reading: {last} unwritten")
        return DeviceGone(
            f"{step.device} was removed from the host during the flush: of the "
            f"{mib(step.dirty_bytes)} not yet written when it began, part or all did not "
            f"reach it (last reading before it vanished: {last}) and is lost; files "
            "written lately on it may be short or missing")

    # -- handing the device over -------------------------------------------------------

    def hold(self, paths: Sequence[str]) -> list[str]:
        """Open every free one of the given block devices with O_EXCL and keep it open, so
        nothing can mount or claim it; return those still claimed by someone else."""
        busy = []
        for path in paths:
            if path in self.held:
                continue
            try:
                self.held[path] = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise StepFailed(f"cannot open {path}: {exc.strerror or exc}") from None
                busy.append(path)
            else:
                self._log(f"hold {path} exclusively")
        return busy

    def release_holds(self) -> None:
        held, self.held = self.held, {}
        self._let_go(held)

    def _let_go(self, held: dict[str, int]) -> None:
        for path, fd in sorted(held.items()):
            if fd >= 0:
                os.close(fd)
            self._log(f"let go of {path}")

    def handoff(self, holds: Sequence[str], interfaces: Sequence[tuple[str, str]]) -> None:
        busy = self.hold(holds)
        if busy:
            raise StepFailed(f"cannot hold {', '.join(busy)} exclusively: claimed by another "
                             "holder (a mount or a program that appeared meanwhile)")
        try:
            # The kernel guard (safeusb guard) refuses every other unbind of usb-storage/uas.
            with contextlib.ExitStack() as guard_mark:
                if interfaces:
                    guard_mark.enter_context(self._guard_handover())
                    # ... and, from before the unbind until the give-back, every bind
                    # but safeusb's own (the device is recorded as handed over).
                    self._guard_handed_over({i.split(":", 1)[0] for i, _ in interfaces})
                for iface, driver in interfaces:
                    self.write_sysfs(os.path.join(self.sys_root, "bus/usb/drivers", driver,
                                                  "unbind"), iface)
            if interfaces:
                self._wait_gone(holds)
                self._let_go_later()
        finally:
            self.release_holds()

    def _let_go_later(self) -> None:
        """Close the holds of disks that are gone, in a thread of their own: the last close
        of each is the rest of the kernel's teardown of its disk (tens of milliseconds
        under emulation), and nothing waits on it (nothing can open them any more)."""
        held, self.held = self.held, {}
        threading.Thread(target=self._let_go, args=(held,),
                         name="safeusb-let-go").start()  # waited for at exit

    def _guard_handed_over(self, ports: set[str]) -> None:
        from safeusb.host.guard import GuardError, mark_handed_over  # noqa: PLC0415

        for port in sorted(ports):
            try:
                mark_handed_over(port, self.sys_root)
            except GuardError as exc:
                raise StepFailed(str(exc)) from None

    @staticmethod
    @contextlib.contextmanager
    def _guard_handover() -> Iterator[None]:
        from safeusb.host.guard import GuardError, handover  # noqa: PLC0415

        mark = handover()
        try:
            mark.__enter__()
        except GuardError as exc:
            raise StepFailed(str(exc)) from None
        try:
            yield
        finally:
            mark.__exit__(None, None, None)

    def _wait_gone(self, disks: Sequence[str], timeout: float = 15.0) -> None:
        names = [os.path.basename(d) for d in disks]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(os.path.exists(os.path.join(self.sys_root, "class/block", n))
                       for n in names):
                return
            time.sleep(0.05)
        raise StepFailed(f"{', '.join(disks)} still present {timeout:g} s after unbinding")

    def bind(self, interface: str, driver: str) -> None:
        path = os.path.join(self.sys_root, "bus/usb/drivers", driver, "bind")
        try:
            # The kernel guard refuses every other bind while a device is handed over.
            with self._guard_handover():
                self.write_sysfs(path, interface)
        except StepFailed:
            if os.path.exists(os.path.join(self.sys_root, "bus/usb/drivers", driver, interface)):
                self._log(f"{interface} is already bound to {driver}")
                return
            raise

    # -- md arrays ---------------------------------------------------------------------

    def assemble_md(self, node: str, members: Sequence[str], tries: int = 3) -> None:
        """mdadm --assemble, once the members have their size. Right after the driver is
        bound again, mdadm has been seen to fail re-reading a member's metadata although
        the disk reads fine: a failed attempt's remains are stopped and it is tried again."""
        mdadm = tool("mdadm")
        for n in range(1, tries + 1):
            self._wait_sized(members)
            try:
                self.run([mdadm, "--assemble", node, *members])
                return
            except CommandFailed as exc:
                if n == tries:
                    raise
                self._log(f"attempt {n} failed ({exc}); stopping what it left, trying again")
                if os.path.exists(os.path.join(self.sys_root, "block",
                                               os.path.basename(os.path.realpath(node)),
                                               "md")):
                    with contextlib.suppress(StepFailed):
                        self.run([mdadm, "--stop", node])
                time.sleep(0.5)

    def _wait_sized(self, nodes: Sequence[str], timeout: float = 10.0) -> None:
        """Until each block device is in sysfs with a size (a partition being scanned or
        a disk still being revalidated shows 0)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sizes = []
            for n in nodes:
                try:
                    with open(os.path.join(self.sys_root, "class/block", os.path.basename(n),
                                           "size"), encoding="ascii") as f:
                        sizes.append(int(f.read()))
                except (OSError, ValueError):
                    sizes.append(0)
            if all(sizes):
                return
            time.sleep(0.1)

    # -- loop devices ------------------------------------------------------------------

    def set_autoclear(self, node: str) -> None:
        """Mark a loop device to detach itself with its last user, as mount -o loop does.
        The flag takes effect at once when nobody has it open, so the device is kept open
        here until :meth:`let_go_of_loops` (once what used it is mounted again)."""
        self._log(f"set autoclear on {node}")
        try:
            fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StepFailed(f"cannot open {node}: {exc.strerror or exc}") from None
        try:
            info = bytearray(_LOOP_INFO64_SIZE)
            fcntl.ioctl(fd, _LOOP_GET_STATUS64, info)
            flags = int.from_bytes(info[_LO_FLAGS_AT:_LO_FLAGS_AT + 4], sys.byteorder)
            info[_LO_FLAGS_AT:_LO_FLAGS_AT + 4] = (flags | _LO_FLAGS_AUTOCLEAR).to_bytes(
                4, sys.byteorder)
            fcntl.ioctl(fd, _LOOP_SET_STATUS64, bytes(info))
        except OSError as exc:
            os.close(fd)
            raise StepFailed(f"setting autoclear on {node}: {exc.strerror or exc}") from None
        old = self.loops_kept.pop(node, None)
        if old is not None:
            os.close(old)
        self.loops_kept[node] = fd

    def let_go_of_loops(self) -> None:
        for node, fd in sorted(self.loops_kept.items()):
            os.close(fd)
            self._log(f"let go of {node}")
        self.loops_kept.clear()

    # -- network interfaces ------------------------------------------------------------

    def link_down(self, step: LinkRecord) -> None:
        what = f"set {step.name} down in network namespace {step.netns}"
        self._log(what)
        path = _netns_path(step.netns, step.netns_path)
        if path is None:
            raise StepFailed(f"{what}: the namespace ({step.netns_where}) is gone")
        with _rtnl(path, what) as ipr:
            found = _link_of(ipr, step)
            if found is None:
                raise StepFailed(f"{what}: it is not there (address {step.mac})")
            _netlink(what, ipr.link, "set", index=found[0], state="down")

    def link_restore(self, step: LinkRecord, timeout: float = 20.0) -> None:
        """Once the driver is bound again: find the interface by its hardware address,
        move it back to its namespace and name, and put back its bridge, addresses, state
        and routes. What is there already (a DHCP client was quicker) is left as it is."""
        what = f"put {step.name} back in network namespace {step.netns}"
        self._log(what)
        home = _netns_path(step.netns, step.netns_path)
        if home is None:
            raise StepFailed(f"{what}: the namespace ({step.netns_where}) no longer exists; "
                             "the interface stays where the kernel puts it")
        deadline = time.monotonic() + timeout
        while True:
            where = _find_link(step, home)
            if where is not None:
                break
            if time.monotonic() > deadline:
                raise StepFailed(f"{what}: it did not come back under "
                                 f"{step.parent or step.port} within {timeout:g} s")
            time.sleep(0.1)
        path, index = where
        if path != home:
            self._log(f"move the interface with index {index} into network namespace "
                      f"{step.netns}")
            fd = os.open(home, os.O_RDONLY | os.O_CLOEXEC)
            try:
                with _rtnl(path, what) as ipr:
                    _netlink(what, ipr.link, "set", index=index, net_ns_fd=fd)
            finally:
                os.close(fd)
        with _rtnl(home, what) as ipr:
            found = _link_of(ipr, step)
            if found is None:
                raise StepFailed(f"{what}: the interface vanished while being moved")
            index, name = found
            if name != step.name:
                self._log(f"rename {name} to {step.name}")
                _netlink(what, ipr.link, "set", index=index, state="down")
                _netlink(what, ipr.link, "set", index=index, ifname=step.name)
            if step.master:
                masters = ipr.link_lookup(ifname=step.master)
                if not masters:
                    raise StepFailed(f"{what}: its bridge {step.master} no longer exists")
                self._log(f"enslave {step.name} to {step.master}")
                _netlink(what, ipr.link, "set", index=index, master=masters[0])
            for _family, address, prefixlen in step.addresses:
                self._log(f"add address {address}/{prefixlen} to {step.name}")
                _netlink(what, ipr.addr, "add", index=index, address=address,
                         prefixlen=prefixlen, exists_ok=True)
            if step.up:
                self._log(f"set {step.name} up")
                _netlink(what, ipr.link, "set", index=index, state="up")
            from socket import AF_INET, AF_INET6  # noqa: PLC0415 (only where routes are put back)

            for family, dst, gateway, table in step.routes:
                self._log(f"add route {dst}{f' via {gateway}' if gateway else ''} "
                          f"dev {step.name} table {table}")
                args: dict[str, Any] = {
                    "family": AF_INET6 if family == 6 else AF_INET,
                    "oif": index, "table": table}
                if dst != "default":
                    args["dst"] = dst
                if gateway:
                    args["gateway"] = gateway
                _netlink(what, ipr.route, "add", exists_ok=True, **args)


class _FlushJob(Protocol):
    def running(self) -> bool: ...
    def wait(self, timeout: float) -> None: ...
    def stop(self) -> str:
        """Stop waiting; what is left running (empty when nothing is)."""
    def failure(self) -> StepFailed | None: ...


class _SyncProcesses:
    def __init__(self, commands: Sequence[Sequence[str]]) -> None:
        self.commands = commands
        self.procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True) for argv in commands]
        self.pidfds = _pidfds(self.procs)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout: float) -> None:
        _wait_exits(self.procs, self.pidfds, timeout)

    def stop(self) -> str:
        for fd in self.pidfds:
            os.close(fd)
        self.pidfds = []
        left = []
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # delivered once the kernel lets it out of its wait
                try:
                    p.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    left.append(f"pid {p.pid} (sync)")
        return ", ".join(left)

    def failure(self) -> StepFailed | None:
        for argv, p in zip(self.commands, self.procs, strict=True):
            if p.returncode != 0:
                err = p.stderr.read() if p.stderr else ""
                return CommandFailed(argv, p.returncode or -1, err)
        return None


class _FsyncThread:
    """fsync each node as `sync NODE` does (open read-only, non-blocking; fsync)."""

    def __init__(self, nodes: Sequence[str]) -> None:
        self.nodes = nodes
        self.error: StepFailed | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="safeusb-fsync")
        self.thread.start()

    def _run(self) -> None:
        for node in self.nodes:
            try:
                fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                self.error = StepFailed(f"fsync {node}: {exc.strerror or exc}")
                return

    def running(self) -> bool:
        return self.thread.is_alive()

    def wait(self, timeout: float) -> None:
        self.thread.join(timeout)

    def stop(self) -> str:
        return f"the fsync of {', '.join(self.nodes)}" if self.thread.is_alive() else ""

    def failure(self) -> StepFailed | None:
        return self.error


def _pidfds(procs: Sequence[subprocess.Popen[str]]) -> list[int]:
    fds = []
    for p in procs:
        with contextlib.suppress(OSError):  # already reaped, or no pidfds on this kernel
            fds.append(os.pidfd_open(p.pid))
    return fds


def _wait_exits(procs: Sequence[subprocess.Popen[str]], pidfds: Sequence[int],
                timeout: float) -> None:
    """Up to timeout, returning as soon as every process has exited."""
    if len(pidfds) != len(procs):
        time.sleep(timeout)
        return
    deadline = time.monotonic() + timeout
    waiting = [fd for fd, p in zip(pidfds, procs, strict=True) if p.poll() is None]
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        ready = select.select(waiting, [], [], left)[0]
        waiting = [fd for fd in waiting if fd not in ready]


def _exited(pidfd: int, timeout: float) -> bool:
    """A pidfd polls readable once its process has exited."""
    return bool(select.select([pidfd], [], [], timeout)[0])


def _netns_path(inode: int, recorded: str) -> str | None:
    """A file that refers to network namespace ``inode`` now: the recorded one while it
    still does, else a process in it or a bind mount of it (ip netns)."""
    candidates = [recorded] if recorded else []
    candidates += ["/proc/self/ns/net", "/proc/1/ns/net"]
    for path in candidates:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                return path
    with contextlib.suppress(OSError):
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                path = f"/proc/{pid}/ns/net"
                with contextlib.suppress(OSError):
                    if os.readlink(path) == f"net:[{inode}]":
                        return path
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for m in parse_mountinfo(f.read()):
                if m.fstype == "nsfs" and m.root == f"net:[{inode}]":
                    return m.mountpoint
    return None


@contextlib.contextmanager
def _rtnl(path: str, what: str) -> Iterator[Any]:
    from safeusb.host.netinfo import socket_in  # noqa: PLC0415 (pyroute2 only where there is a network)

    try:
        ipr = socket_in(path)
    except OSError as exc:
        raise StepFailed(f"{what}: cannot enter {path}: {exc.strerror or exc}") from None
    try:
        yield ipr
    finally:
        ipr.close()


def _netlink(what: str, call: Callable[..., Any], *args: Any, exists_ok: bool = False,
             **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except Exception as exc:  # pyroute2's NetlinkError carries the errno as .code
        code = getattr(exc, "code", None)
        if exists_ok and code == errno.EEXIST:
            return
        text = os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
        raise StepFailed(f"{what}: {text}") from None


def _link_of(ipr: Any, step: LinkRecord) -> tuple[int, str] | None:
    """The device's interface in this namespace: the one under the same USB interface
    with the same hardware address; else the only one under that USB interface (a driver
    without a fixed address, such as cdc_subset, makes up a new one on every bind)."""
    from safeusb.host.netinfo import link_id  # noqa: PLC0415

    ours = []
    for msg in ipr.get_links():
        link = link_id(0, msg)
        if step.parent:
            if link.parent_dev != step.parent:
                continue
        elif link.parent_dev is not None and not link.parent_dev.startswith(f"{step.port}:"):
            continue
        if (link.perm_address or link.address or "").lower() == step.mac:
            return link.ifindex, link.name
        ours.append((link.ifindex, link.name))
    return ours[0] if step.parent and len(ours) == 1 else None


def _find_link(step: LinkRecord, home: str) -> tuple[str, int] | None:
    """Where the interface is now: its own namespace, or the host's (new interfaces
    appear in the initial network namespace)."""
    for path in dict.fromkeys((home, "/proc/self/ns/net", "/proc/1/ns/net")):
        with contextlib.suppress(StepFailed), _rtnl(path, "look for the interface") as ipr:
            found = _link_of(ipr, step)
            if found is not None:
                return path, found[0]
    return None


# <linux/loop.h>: struct loop_info64 is 232 bytes, lo_flags a __u32 at offset 52.
_LOOP_SET_STATUS64 = 0x4C04
_LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64_SIZE = 232
_LO_FLAGS_AT = 52
_LO_FLAGS_AUTOCLEAR = 4

_FLAGS = {
    "ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "sync": 16, "dirsync": 128,
    "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24,
    "lazytime": 1 << 25,
}


def _mount_flags(options: str) -> tuple[int, str]:
    flags = 0
    data = []
    for opt in options.split(","):
        if opt in _FLAGS:
            flags |= _FLAGS[opt]
        elif opt and opt != "rw":
            data.append(opt)
    return flags, ",".join(data)


def stderr_progress(text: str) -> None:
    """A one-line progress display on a terminal."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + text)
        sys.stderr.flush()
