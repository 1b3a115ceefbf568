"""Steps: one action each on the host, as data. A step describes itself, carries itself out
through the Runner (runner.py, the one place that changes the system) and undoes itself where
that can be done; it is recorded in the journal as its JSON and read back by
step_from_json. Adding a kind of step is one class here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from safeusb.host.journal import StateError
from safeusb.host.runner import Runner, StepFailed, log, tool
from safeusb.textout import human_bytes
from safeusb.values import frozen


@frozen
class Step:
    """One action on the host."""

    kind: ClassVar[str] = "step"
    by_kind: ClassVar[dict[str, type[Step]]] = {}  # every kind of step, by its JSON kind

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind in Step.by_kind:
            raise TypeError(f"two kinds of step are called {cls.kind!r}")
        Step.by_kind[cls.kind] = cls

    def describe(self) -> str:
        raise NotImplementedError

    def execute(self, runner: Runner) -> None:
        raise NotImplementedError

    def undo(self, runner: Runner) -> None:
        """Put back what execute took; raise UndoImpossible when it cannot be done."""
        raise UndoImpossible(f"cannot undo: {self.describe()}")

    def as_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items()}
        return {"kind": self.kind, "text": self.describe(), **data}


class UndoImpossible(Exception):
    pass


@frozen
class Kill(Step):
    kind: ClassVar[str] = "kill"
    pid: int
    comm: str

    def describe(self) -> str:
        return f"end pid {self.pid} ({self.comm}) (TERM, then KILL)"

    def execute(self, runner: Runner) -> None:
        runner.kill(self.pid, self.comm)


@frozen
class Flush(Step):
    kind: ClassVar[str] = "flush"
    device: str  # the device whose statistics account the data: "sda"
    bdi: str  # "8:0"
    dirty_bytes: int
    filesystems: tuple[tuple[int, str], ...]  # (pid in the namespace, mountpoint)
    nodes: tuple[str, ...]  # raw nodes whose page cache to write: "/dev/sda"

    def describe(self) -> str:
        return f"flush {human_bytes(self.dirty_bytes)} on {self.device}"

    def execute(self, runner: Runner) -> None:
        runner.flush(self)

    def undo(self, runner: Runner) -> None:
        return None  # writing data back leaves nothing to undo


@frozen
class Unmount(Step):
    kind: ClassVar[str] = "unmount"
    device: str
    source: str
    mountpoint: str
    fstype: str
    options: str
    mnt_ns: int
    pid: int

    def describe(self) -> str:
        ns = f"mount namespace {self.mnt_ns}" if self.mnt_ns else f"the namespace of pid {self.pid}"
        return f"unmount {self.mountpoint} in {ns}"

    def execute(self, runner: Runner) -> None:
        runner.umount_in(self.pid, self.mnt_ns, self.mountpoint)

    def undo(self, runner: Runner) -> None:
        runner.mount_in(self.pid, self.mnt_ns, self.source, self.mountpoint, self.fstype,
                        self.options)


@frozen
class Swapoff(Step):
    kind: ClassVar[str] = "swapoff"
    path: str

    def describe(self) -> str:
        return f"swapoff {self.path}"

    def execute(self, runner: Runner) -> None:
        runner.run([tool("swapoff"), self.path])

    def undo(self, runner: Runner) -> None:
        runner.run([tool("swapon"), self.path])


@frozen
class DetachLoop(Step):
    """Detach a loop device backed by a file on the device, keeping how it was attached.

    The backing file's path is the one the kernel shows: as seen in the mount namespace
    where its filesystem is mounted. It is reached again through /proc/PID/root of a
    process there (pid 0: this process's own view)."""

    kind: ClassVar[str] = "detach-loop"
    node: str
    backing_file: str
    offset: int = 0
    sizelimit: int = 0
    read_only: bool = False
    partscan: bool = False
    direct_io: bool = False
    sector_size: int = 512
    autoclear: bool = False  # set up by mount -o loop: it goes away with its last user
    pid: int = 0
    mnt_ns: int = 0

    def describe(self) -> str:
        return f"detach loop device {self.node} ({self.backing_file})"

    def _bound_to(self, runner: Runner) -> str | None:
        """The backing file the loop device has now (None: not attached)."""
        return runner.loop_backing_file(self.node)

    def execute(self, runner: Runner) -> None:
        now = self._bound_to(runner)
        if now is None:
            # An autoclear loop (mount -o loop) went away when its filesystem was
            # unmounted: nothing to detach; undo attaches it again.
            log.info("%s is already detached (it went with its last user)", self.node)
            return
        if now != self.backing_file:
            raise StepFailed(f"{self.node} is now backed by {now}, not "
                             f"{self.backing_file}; left alone")
        runner.run([tool("losetup"), "--detach", self.node])
        if self._bound_to(runner) is not None:
            # LOOP_CLR_FD on a device still open only marks it to go with its last user.
            raise StepFailed(f"{self.node} is still in use after losetup --detach (the "
                             "kernel detaches it when its last user closes it)")

    def undo(self, runner: Runner) -> None:
        if self._bound_to(runner) == self.backing_file:
            log.info("%s is attached to %s already", self.node, self.backing_file)
            return
        backing = self.backing_file
        if self.pid:
            if self.mnt_ns and not runner.in_mount_namespace(self.pid, self.mnt_ns):
                raise StepFailed(f"cannot attach {self.node} again: pid {self.pid} is no "
                                 f"longer in mount namespace {self.mnt_ns}, where "
                                 f"{backing} lies")
            backing = runner.seen_by(self.pid, backing)
        argv = [tool("losetup")]
        if self.offset:
            argv += ["--offset", str(self.offset)]
        if self.sizelimit:
            argv += ["--sizelimit", str(self.sizelimit)]
        if self.sector_size and self.sector_size != 512:
            argv += ["--sector-size", str(self.sector_size)]
        if self.read_only:
            argv.append("--read-only")
        if self.partscan:
            argv.append("--partscan")
        if self.direct_io:
            argv.append("--direct-io=on")
        runner.run([*argv, self.node, backing])
        if self.autoclear:
            runner.set_autoclear(self.node)


@frozen
class CloseCrypt(Step):
    kind: ClassVar[str] = "close-crypt"
    name: str

    def describe(self) -> str:
        return f"close dm-crypt {self.name}"

    def execute(self, runner: Runner) -> None:
        runner.run([tool("cryptsetup"), "close", self.name])

    def undo(self, runner: Runner) -> None:
        raise UndoImpossible(f"dm-crypt {self.name} needs its key to be opened again")


@frozen
class DeactivateLV(Step):
    kind: ClassVar[str] = "deactivate-lv"
    vg: str
    lv: str

    def describe(self) -> str:
        return f"deactivate LVM logical volume {self.vg}/{self.lv}"

    def execute(self, runner: Runner) -> None:
        runner.run([tool("lvchange"), "--activate", "n", f"{self.vg}/{self.lv}"])

    def undo(self, runner: Runner) -> None:
        runner.run([tool("lvchange"), "--activate", "y", f"{self.vg}/{self.lv}"])


@frozen
class StopMd(Step):
    kind: ClassVar[str] = "stop-md"
    node: str
    members: tuple[str, ...]

    def describe(self) -> str:
        return f"stop md array {self.node}"

    def execute(self, runner: Runner) -> None:
        runner.run([tool("mdadm"), "--stop", self.node])

    def undo(self, runner: Runner) -> None:
        runner.assemble_md(self.node, self.members)


@frozen
class RemoveDm(Step):
    kind: ClassVar[str] = "remove-dm"
    name: str

    def describe(self) -> str:
        return f"remove device-mapper device {self.name}"

    def execute(self, runner: Runner) -> None:
        runner.run([tool("dmsetup"), "remove", self.name])


@frozen
class DownLink(Step):
    """Take a network interface of the device down, keeping what release needs to put
    it back: where it was (namespace, name, bridge), whether it was up, and what was
    configured on it by hand (permanent addresses, routes that are not the kernel's or
    learnt from router advertisements; those come back by themselves)."""

    kind: ClassVar[str] = "link-down"
    name: str  # "usb0"
    mac: str  # how to know it again when the driver is bound anew
    port: str  # the USB device it belongs to: "2-1"
    netns: int  # inode of its network namespace
    netns_path: str  # a file referring to that namespace when prepare ran
    netns_where: str  # "pid 1 (systemd)", "/run/netns/blue"
    up: bool
    master: str | None
    addresses: tuple[tuple[int, str, int], ...]  # (4 or 6, address, prefix length)
    routes: tuple[tuple[int, str, str | None, int], ...]  # (4 or 6, dst, gateway, table)
    parent: str = ""  # the USB interface it hangs under: "2-1:1.0"

    def describe(self) -> str:
        kept = [f"{a}/{n}" for _, a, n in self.addresses]
        kept += [f"route {d}" + (f" via {g}" if g else "") for _, d, g, _ in self.routes]
        if self.master:
            kept.append(f"in {self.master}")
        what = f" (keeping {', '.join(kept)})" if kept else ""
        return f"take {self.name} down in network namespace {self.netns}{what}"

    def execute(self, runner: Runner) -> None:
        runner.link_down(self)

    def undo(self, runner: Runner) -> None:
        runner.link_restore(self)


@frozen
class Handoff(Step):
    """Hold the device's partitions (or partitionless disks) with O_EXCL, so nothing can
    mount or claim them, while the mass-storage driver is unbound from the interfaces; the
    disks then go away. The runner takes each hold as soon as teardown frees the device."""

    kind: ClassVar[str] = "handoff"
    disks: tuple[str, ...]  # what to hold: "/dev/sda1", "/dev/sda2" (or "/dev/sda")
    interfaces: tuple[tuple[str, str], ...]  # ("2-1:1.0", "usb-storage")

    def describe(self) -> str:
        unbind = ", ".join(f"unbind {drv} from {iface}" for iface, drv in self.interfaces)
        hold = ", ".join(self.disks)
        if not self.interfaces:
            return f"hold {hold} exclusively to prove nothing claims it (not on USB)"
        return f"hold {hold} exclusively; {unbind}" if hold else unbind

    def execute(self, runner: Runner) -> None:
        runner.handoff(self.disks, self.interfaces)

    def undo(self, runner: Runner) -> None:
        for iface, driver in self.interfaces:
            runner.bind(iface, driver)


def step_from_json(doc: dict[str, Any]) -> Step:
    """A step as recorded; StateError when the record does not describe one."""
    cls = Step.by_kind.get(doc.get("kind", ""))
    if cls is None:
        raise StateError(f"unknown step in state: {doc.get('kind')!r}")
    fields = {k: v for k, v in doc.items() if k not in ("kind", "text")}
    for k, v in list(fields.items()):
        if isinstance(v, list):
            fields[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    try:
        step = cls(**fields)
        step.describe()
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        raise StateError(f"a recorded {cls.kind} step is malformed ({exc})") from None
    return step
