"""Real-kernel harness (the VM tier, `safeusb demo`): a Debian kernel under QEMU, USB devices.

A :class:`Boot` is one VM run: the emulated devices it gets (USB sticks built from
image files made here, outside the guest, plus other emulated USB devices), whether
libvirtd and a nested domain run inside, and an ordered list of :class:`Scenario`.
Each scenario is a bash script in the directory :func:`run_boot` is given (the tests'
``tests/vm/guest/``, the demo's ``guest/`` beside this module) that the guest driver
(``guest/driver.sh`` here) runs with its own output directory in ``$OUT``; results come
back through a directory shared read-write with the guest, never by parsing the console.

The guest sees this machine's root filesystem (virtme-ng shares it read-only), so it
runs the safeusb this module belongs to: a checkout's ``.venv/bin/safeusb`` (the tests),
or the installed package's scripts (``safeusb demo`` from a wheel or a distribution
package).

After the VM has exited, :meth:`BootResult.check_stick` looks at a stick's image on
this machine (journal replayed on a loop-mounted copy, ``e2fsck -fn``, checksums of
files whose content was generated here) as ground truth of what reached the disk.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NoReturn

from safeusb.values import frozen

#: The guest's driver, its helpers (lib.sh, libvirt-up.sh, stock-up.sh), the nested
#: domain g1.xml, and the demo's scenarios.
LAB_GUEST = Path(__file__).resolve().parent / "guest"


def _checkout() -> Path | None:
    """The source checkout this module lives in (tests, benchmarks), or None when it is
    an installed package."""
    top = Path(__file__).resolve().parents[2]
    if (top / "pyproject.toml").is_file() and (top / "tests" / "vm").is_dir():
        return top
    return None


def _installed_bin() -> Path:
    """Where the installation running this put the safeusb command: next to the
    interpreter (a virtual environment, /usr/bin), else the scheme's scripts directory."""
    beside = Path(sys.executable).parent
    if (beside / "safeusb").exists():
        return beside
    return Path(sysconfig.get_path("scripts"))


#: The checkout (None when installed): the tests' scripts use it (``$REPO``).
REPO = _checkout()
#: The directory of the safeusb commands the guest runs: the checkout's .venv, or the
#: installed package's scripts.
VENV_BIN = REPO / ".venv" / "bin" if REPO is not None else _installed_bin()
SAFEUSB = VENV_BIN / "safeusb"
#: The interpreter that runs them (the guest asks safeusbd through it).
PYTHON = (VENV_BIN / "python" if REPO is not None or (VENV_BIN / "python").exists()
          else Path(sys.executable))
#: What virtme-ng's guest init mounts over this machine's tree: the guest does not see
#: what is there (``/tmp`` is an overlay of this machine's, so it does).
GUEST_HIDDEN = ("/run", "/var/tmp", "/var/log", "/dev", "/proc", "/sys")  # noqa: S108
MIB = 1024 * 1024

#: Kernel log lines worth showing when a scenario fails.
KERNEL_NOTABLE = re.compile(
    r"Buffer I/O error|lost async page write|EXT4-fs (error|warning)|Aborting journal"
    r"|I/O error|JBD2|Remounting filesystem read-only|device offline|USB disconnect"
    r"|BUG:|WARNING:|Call Trace|segfault|Out of memory|blocked for more than"
)


class VmUnavailable(Exception):
    """A prerequisite of the VM tier is missing on this machine."""


class LabFailure(Exception):
    """A boot or scenario did not give what was asked of it (outside pytest)."""


def fail(message: str) -> NoReturn:
    """Under pytest (the VM tier), fail the test with ``message`` alone, no traceback;
    elsewhere (the demo, benchmarks) raise :class:`LabFailure`."""
    pytest = sys.modules.get("pytest")
    if pytest is not None:
        pytest.fail(message, pytrace=False)
    raise LabFailure(message)


# --------------------------------------------------------------------------- devices


@frozen
class Partition:
    start_mib: int
    size_mib: int
    fs: Literal["ext4", "none"] = "ext4"


@frozen
class Image:
    """How a stick's image file is built outside the guest.

    ``fs`` formats the whole disk (no partition table); ``partitions`` writes an
    msdos table with sfdisk and formats each partition at its offset. LUKS, LVM, md
    and swap need the guest's kernel: scenarios make those inside.
    """

    size_mib: int = 64
    fs: Literal["ext4", "none"] = "none"
    partitions: tuple[Partition, ...] = ()

    @classmethod
    def raw(cls, size_mib: int = 64) -> Image:
        return cls(size_mib=size_mib)

    @classmethod
    def ext4(cls, size_mib: int = 64) -> Image:
        return cls(size_mib=size_mib, fs="ext4")

    @classmethod
    def msdos(cls, *partitions: Partition, size_mib: int = 64) -> Image:
        return cls(size_mib=size_mib, partitions=partitions)

    @classmethod
    def msdos_two(cls, size_mib: int = 64) -> Image:
        """msdos table, two ext4 partitions filling the disk after the first MiB."""
        half = (size_mib - 1) // 2
        return cls.msdos(Partition(1, half), Partition(1 + half, size_mib - 1 - half),
                         size_mib=size_mib)

    def build(self, path: Path) -> None:
        with path.open("wb") as f:
            f.truncate(self.size_mib * MIB)
        if self.fs == "ext4":
            _run(["mkfs.ext4", "-q", "-F", "-L", "stick", str(path)])
        if not self.partitions:
            return
        table = "label: dos\n" + "".join(
            f"start={p.start_mib * 2048}, size={p.size_mib * 2048}, type=83\n"
            for p in self.partitions
        )
        _run(["sfdisk", "-q", str(path)], stdin=table)
        for p in self.partitions:
            if p.fs == "ext4":
                _run(["mkfs.ext4", "-q", "-F", "-E", f"offset={p.start_mib * MIB}",
                      str(path), f"{p.size_mib * 1024}k"])


@frozen
class Stick:
    """An emulated usb-storage stick backed by an image file built outside.

    Inside the guest, a stick named ``data`` is known to scenarios through
    ``DATA_DEV`` (``/dev/sdX``), ``DATA_USB`` (sysfs name such as ``2-1``),
    ``DATA_BUSDEV`` (``2:3``) and ``DATA_SERIAL``.
    """

    name: str
    image: Image = field(default_factory=Image.raw)
    write_bps: int | None = None  # QEMU write throttling of its drive, bytes per second
    # False: not plugged in at boot; a scenario plugs it (``plug NAME``) and may pull and
    # plug it again. Its image is a -blockdev node, which outlives device_del (a -drive
    # would be deleted with the device).
    plugged: bool = True

    @property
    def var(self) -> str:
        return re.sub(r"[^A-Za-z0-9]", "_", self.name).upper()

    def serial(self, index: int) -> str:
        return f"SU{index:02d}{self.var[:12]}"

    def qemu_args(self, index: int, image: Path) -> list[str]:
        drive = self.drive(index)
        if not self.plugged:
            return ["-blockdev", f"driver=raw,node-name={drive},file.driver=file,"
                    f"file.filename={image}"]
        return [
            "-drive", f"if=none,id={drive},format=raw,file={image}"
            + (f",throttling.bps-write={self.write_bps}" if self.write_bps else ""),
            "-device", f"usb-storage,bus=xhci.0,drive={drive},serial={self.serial(index)},"
            f"id={self.device_id(index)}",
        ]

    @staticmethod
    def device_id(index: int) -> str:
        """QEMU's id of the stick's device, for ``device_del`` (a pulled stick)."""
        return f"usbstick{index}"

    @staticmethod
    def drive(index: int) -> str:
        return f"stick{index}"

    def device_add(self, index: int) -> dict[str, str]:
        """QMP ``device_add`` arguments that plug the stick in (again)."""
        return {"driver": "usb-storage", "bus": "xhci.0", "drive": self.drive(index),
                "serial": self.serial(index), "id": self.device_id(index)}


@frozen
class UsbDevice:
    """Any other emulated USB device (keyboard, serial adapter, network adapter...)."""

    driver: str
    props: tuple[str, ...] = ()
    backend: tuple[str, ...] = ()  # extra QEMU options the device needs (-chardev, -netdev)

    @classmethod
    def kbd(cls) -> UsbDevice:
        return cls("usb-kbd")

    @classmethod
    def mouse(cls) -> UsbDevice:
        return cls("usb-mouse")

    @classmethod
    def tablet(cls) -> UsbDevice:
        return cls("usb-tablet")

    @classmethod
    def serial_port(cls, index: int = 0) -> UsbDevice:
        return cls("usb-serial", (f"chardev=userial{index}",),
                   ("-chardev", f"file,id=userial{index},path=/dev/null"))

    @classmethod
    def net(cls, index: int = 0) -> UsbDevice:
        return cls("usb-net", (f"netdev=unet{index}",),
                   ("-netdev", f"user,id=unet{index},restrict=on"))

    def qemu_args(self) -> list[str]:
        return [*self.backend, "-device", ",".join([self.driver, "bus=xhci.0", *self.props])]


# --------------------------------------------------------------------------- plan


@frozen
class Scenario:
    """One guest script and what it needs; reported as its own test.

    ``script`` is a file in the boot's scenario directory (see :func:`run_boot`), or
    an absolute path (the demo's boot, run by the tests too).
    ``payloads`` maps a file name to a size: random content generated here, readable in
    the guest under ``$PAYLOAD/<name>``, its checksum kept here for the outside check.
    """

    name: str
    script: str
    payloads: Mapping[str, int] = field(default_factory=dict)
    timeout: int = 300  # a hung scenario only; two boots share the cores (tests/vm/README)


#: The VM tier's kernel series: Debian 12's own (linux-image-amd64). A boot may ask for
#: another series installed beside it (Boot.kernel): setup-vm-tier installs Debian 12's
#: linux-image-6.12-amd64 too, the series of Debian 13 and RHEL 10.
STOCK_KERNEL = "6.1"
KERNEL_PACKAGES = {"6.1": "linux-image-amd64", "6.12": "linux-image-6.12-amd64"}


@frozen
class Boot:
    name: str
    scenarios: tuple[Scenario, ...]
    sticks: tuple[Stick, ...] = ()
    devices: tuple[UsbDevice, ...] = ()
    libvirt: bool = False
    # hook name ("qemu" or "qemu.d/NAME") -> a file to copy, or the hook's text
    libvirt_hooks: Mapping[str, Path | str] = field(default_factory=dict)
    modules: tuple[str, ...] = ("xhci_pci", "usb_storage", "sd_mod")
    memory: str = "3G"
    timeout: int = 900
    rw_overlays: tuple[str, ...] = ()  # more of the host's directories made writable
    safeusbd: bool = False  # start safeusbd (from .venv) before libvirtd
    # libvirt as Debian ships it ("stock"), or root QEMU without confinement ("lab"):
    # only for a scenario that says why.
    libvirt_config: str = "stock"
    # name -> file for $SHARE/files/NAME, or what makes it in a directory of the boot's
    # own, run when the boot is (a package built meanwhile)
    files: Mapping[str, Path | Callable[[Path], Path]] = field(default_factory=dict)
    # stock: `safeusb install-confinement` from .venv before libvirtd (stock-up.sh); off
    # for a boot that installs safeusb its own way (the package boot).
    safeusb_confinement: bool = True
    nested_domain: bool = True  # define and start g1 (paused) once libvirtd is up
    # races a step of prepare against a program in a window of its own: runs with no
    # other boot beside it (a second VM on the same cores makes the window miss)
    alone: bool = False
    # the guest's kernel series (find_kernel): Debian 12's unless a boot says why
    kernel: str = STOCK_KERNEL

    def stick(self, name: str) -> Stick:
        for s in self.sticks:
            if s.name == name:
                return s
        raise KeyError(name)


# --------------------------------------------------------------------------- results


@frozen
class InspectRun:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    def reasons(self, kind: str) -> list[dict[str, Any]]:
        data = self.json
        return [r for r in data.get("reasons", []) if r.get("kind") == kind]

    def __str__(self) -> str:
        return f"exit {self.rc}\nstdout: {self.stdout.strip()}\nstderr: {self.stderr.strip()}"


@frozen
class FileState:
    path: str
    status: Literal["ok", "missing", "short", "mismatch"]
    size: int | None
    expected_size: int


@frozen
class ImageCheck:
    """What an image holds, read on this machine after the VM has gone."""

    mount_error: str | None
    fsck_rc: int
    fsck_output: str
    files: tuple[FileState, ...]

    @property
    def intact(self) -> bool:
        return (self.mount_error is None and self.fsck_rc == 0
                and all(f.status == "ok" for f in self.files))

    def summary(self) -> str:
        lines = [f"mount: {self.mount_error or 'ok (journal replayed)'}",
                 f"e2fsck -fn: exit {self.fsck_rc}"]
        lines += [f"  {ln}" for ln in self.fsck_output.splitlines()
                  if ln and not ln.startswith(("Pass ", "e2fsck "))][:15]
        lines += [f"{f.path}: {f.status} (size {f.size}, expected {f.expected_size})"
                  for f in self.files]
        return "\n".join(lines)


@dataclass
class ScenarioResult:
    name: str
    boot: str
    out: Path
    rc: int | None
    stdout: str
    stderr: str
    kernel: str
    seconds: float | None

    def file(self, name: str) -> str:
        p = self.out / name
        return p.read_text(errors="replace") if p.exists() else ""

    def notes(self) -> dict[str, str]:
        """The facts the guest script wrote with ``note KEY VALUE``."""
        return dict(line.split("=", 1) for line in self.file("notes").splitlines()
                    if "=" in line)

    def inspect(self, tag: str) -> InspectRun:
        """Result of ``inspect TAG ...`` called in the guest script (see guest/lib.sh)."""
        rc = self.file(f"{tag}.rc").strip()
        if not rc:
            self.fail(f"the guest script did not run inspect step {tag!r}")
        return InspectRun(int(rc), self.file(f"{tag}.out"), self.file(f"{tag}.err"))

    def notable_kernel_lines(self) -> list[str]:
        return [ln for ln in self.kernel.splitlines() if KERNEL_NOTABLE.search(ln)]

    def report(self, message: str) -> str:
        parts = [f"[vm scenario {self.boot}/{self.name}] {message}",
                 f"guest script exit: {self.rc}"]
        for title, text in (("script stdout", self.stdout), ("script stderr", self.stderr)):
            tail = text.strip().splitlines()[-20:]
            if tail:
                parts.append(f"--- {title} (last {len(tail)} lines)")
                parts += tail
        kern = self.notable_kernel_lines()[-20:]
        if kern:
            parts.append("--- guest kernel")
            parts += kern
        return "\n".join(parts)

    def fail(self, message: str) -> NoReturn:
        fail(self.report(message))

    def expect(self, condition: object, message: str) -> None:
        if not condition:
            self.fail(message)

    def expect_ran(self) -> None:
        self.expect(self.rc == 0, f"guest script failed (exit {self.rc})")


@dataclass
class BootResult:
    boot: Boot
    workdir: Path
    rc: int | None
    wall_seconds: float
    error: str | None
    timings: dict[str, float]
    payload_sums: dict[str, dict[str, tuple[str, int]]]
    retried: str | None = None  # why the boot was made again (see run_boot)

    @property
    def share(self) -> Path:
        return self.workdir / "share"

    @property
    def console(self) -> str:
        p = self.workdir / "console.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def boot_report(self, message: str) -> str:
        lines = self.console.splitlines()
        notable = [ln for ln in lines if KERNEL_NOTABLE.search(ln)][-15:]
        tail = 25 if self.rc is not None else 80  # killed: SysRq-W's stacks too
        marks = [f"{k} {v:.1f}" for k, v in sorted(self.timings.items(), key=lambda i: i[1])]
        return "\n".join([f"[vm boot {self.boot.name}] {message}",
                          "--- guest marks (uptime s)", *marks,
                          *self._unfinished_scenarios(),
                          "--- console (notable lines)", *notable,
                          f"--- console (last {tail} lines)", *lines[-tail:]])

    def _unfinished_scenarios(self) -> list[str]:
        """What a scenario that never ended had written so far (the share is the host's
        directory: readable after the VM was killed)."""
        out: list[str] = []
        for s in self.boot.scenarios:
            d = self.share / "out" / s.name
            if not d.is_dir() or (d / "rc").exists():
                continue
            for name in ("notes", "stdout", "stderr"):
                p = d / name
                text = p.read_text(errors="replace").splitlines()[-15:] if p.exists() else []
                if text:
                    out += [f"--- scenario {s.name} unfinished: {name} (last 15 lines)", *text]
        return out

    def scenario(self, name: str) -> ScenarioResult:
        if name not in {s.name for s in self.boot.scenarios}:
            raise KeyError(name)
        out = self.share / "out" / name
        rc_text = (out / "rc").read_text().strip() if (out / "rc").exists() else ""
        if not rc_text:
            why = self.error or "the guest never ran this scenario"
            fail(self.boot_report(f"scenario {name}: {why}"))
        start = self.timings.get(f"scenario_start:{name}")
        end = self.timings.get(f"scenario_end:{name}")

        def read(n: str) -> str:
            p = out / n
            return p.read_text(errors="replace") if p.exists() else ""

        return ScenarioResult(
            name=name, boot=self.boot.name, out=out, rc=int(rc_text),
            stdout=read("stdout"), stderr=read("stderr"), kernel=read("kernel.log"),
            seconds=None if start is None or end is None else end - start,
        )

    def stick_vars(self, stick: str) -> dict[str, str]:
        """What the guest found for ``stick``: DEV, USB, BUSDEV, SERIAL."""
        prefix = f"export {self.boot.stick(stick).var}_"
        p = self.share / "sticks.env"
        found = {}
        for line in p.read_text().splitlines() if p.exists() else []:
            if line.startswith(prefix):
                key, _, value = line.removeprefix(prefix).partition("=")
                found[key] = value
        return found

    def stick_disk(self, stick: str) -> str:
        """The stick's disk name in the guest (``sdb``)."""
        dev = self.stick_vars(stick).get("DEV")
        if dev is None:
            fail(self.boot_report(f"stick {stick} never appeared in the guest"))
        return dev.removeprefix("/dev/")

    def image(self, stick: str) -> Path:
        self.boot.stick(stick)
        return self.workdir / "img" / f"{stick}.img"

    def check_stick(self, stick: str, files: Mapping[str, tuple[str, str]],
                    partition: int | None = None) -> ImageCheck:
        """Ground truth for ``stick``: ``files`` maps a path on its filesystem to the
        (scenario, payload) whose content it must hold. ``partition`` is 1-based."""
        img = self.boot.stick(stick).image
        offset, size = 0, img.size_mib * MIB
        if partition is not None:
            part = img.partitions[partition - 1]
            offset, size = part.start_mib * MIB, part.size_mib * MIB
        expected = {path: self.payload_sums[sc][name] for path, (sc, name) in files.items()}
        return check_image(self.image(stick), expected, offset=offset, size=size)


# --------------------------------------------------------------------------- machinery


def libvirt_scenario(vm: BootResult, name: str) -> tuple[ScenarioResult, dict[str, str]]:
    """A scenario of a boot with libvirt that ran, and its notes; the test fails with
    libvirt's log when libvirtd or the nested domain g1 did not start."""
    if "domain_started" not in vm.timings:
        log = vm.share / "out" / "libvirt.log"
        fail(vm.boot_report("libvirtd or the nested domain g1 did not start\n"
                            + (log.read_text() if log.exists() else "")))
    r = vm.scenario(name)
    r.expect_ran()
    return r, r.notes()


def step(r: ScenarioResult, tag: str) -> str:
    """What a guest script's run_step TAG kept: exit code, stdout and stderr."""
    return (f"{tag}: exit {r.file(f'{tag}.rc').strip()}\n{r.file(f'{tag}.out')}"
            f"{r.file(f'{tag}.err')}")


def _which(tool: str) -> str:
    """The tool's absolute path, searched as a boot searches it (:func:`tool_path`)."""
    found = shutil.which(tool, path=tool_path())
    if found is None:
        raise VmUnavailable(f"{tool} not found in {tool_path()}")
    return found


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    proc = subprocess.run([_which(argv[0]), *argv[1:]], input=stdin, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def find_kernel(series: str = STOCK_KERNEL, boot: str = "/boot",
                modules: str = "/lib/modules") -> Path | None:
    """Newest Debian kernel image of a series ("6.1": 6.1.*, not 6.12.*) whose modules
    are installed."""
    found = []
    for k in glob.glob(f"{glob.escape(boot)}/vmlinuz-{glob.escape(series)}.*"):
        ver = k.removeprefix(f"{boot}/vmlinuz-")
        if Path(f"{modules}/{ver}/kernel").is_dir():
            found.append(Path(k))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _kernel_package(series: str) -> str:
    return KERNEL_PACKAGES.get(series, f"linux-image-{series}-amd64")


def tool_dirs() -> list[str]:
    """Searched before PATH: safeusb's own bin directory (vng installed beside it), the
    interpreter's, and the system's sbin directories."""
    dirs = [str(VENV_BIN), str(Path(sys.executable).parent), "/usr/sbin", "/sbin"]
    return list(dict.fromkeys(dirs))


def tool_path() -> str:
    return os.pathsep.join([*tool_dirs(), os.environ.get("PATH", "/usr/bin:/bin")])


#: What a boot runs on this machine, and where each comes from.
TOOLS = {
    "vng": "virtme-ng: pip install virtme-ng beside safeusb",
    "qemu-system-x86_64": "Debian package qemu-system-x86",
    "depmod": "Debian package kmod",
    "mkfs.ext4": "Debian package e2fsprogs",
    "e2fsck": "Debian package e2fsprogs",
    "sfdisk": "Debian package fdisk",
    "losetup": "Debian package mount",
}


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run a boot, each with where to get it."""
    missing = []
    if os.geteuid() != 0:
        missing.append("not running as root (loop devices, mounts)")
    if find_kernel() is None:
        missing.append(f"no Debian {STOCK_KERNEL} kernel in /boot with modules in "
                       f"/lib/modules (Debian package {_kernel_package(STOCK_KERNEL)})")
    path = tool_path()
    for tool, source in TOOLS.items():
        if shutil.which(tool, path=path) is None:
            missing.append(f"{tool} not found in {', '.join(tool_dirs())} or PATH ({source})")
    for what in (LAB_GUEST, VENV_BIN):
        hidden = next((d for d in GUEST_HIDDEN if what.is_relative_to(d)), None)
        if hidden is not None:
            missing.append(f"{what} is under {hidden}, which the guest does not see "
                           f"(virtme-ng mounts its own {hidden} there): install safeusb "
                           "elsewhere")
    return missing


def _make_payloads(share: Path, boot: Boot) -> dict[str, dict[str, tuple[str, int]]]:
    sums: dict[str, dict[str, tuple[str, int]]] = {}
    for sc in boot.scenarios:
        d = share / "payload" / sc.name
        d.mkdir(parents=True, exist_ok=True)
        sums[sc.name] = {}
        for name, size in sc.payloads.items():
            data = os.urandom(size)
            (d / name).write_bytes(data)
            sums[sc.name][name] = (hashlib.sha256(data).hexdigest(), size)
    return sums


def _write_plan(share: Path, boot: Boot, scenario_dir: Path) -> None:
    scripts = share / "scenarios"
    scripts.mkdir(parents=True, exist_ok=True)
    shutil.copy(LAB_GUEST / "lib.sh", share / "lib.sh")
    plan = []
    for sc in boot.scenarios:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", sc.name):
            raise ValueError(f"bad scenario name {sc.name!r}")
        shutil.copy(scenario_dir / sc.script, scripts / f"{sc.name}.sh")
        plan.append(f"{sc.name} {sc.timeout}\n")
    (share / "plan").write_text("".join(plan))
    if boot.libvirt_hooks:
        (share / "hooks").mkdir()
        for hook, src in boot.libvirt_hooks.items():  # "qemu" or "qemu.d/NAME"
            dest = share / "hooks" / hook
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, Path):
                shutil.copy(src, dest)
            else:
                dest.write_text(src)
    if boot.files:
        (share / "files").mkdir()
        for name, source in boot.files.items():
            if isinstance(source, Path):
                path = source
            else:
                made = share.parent / "made" / name
                made.mkdir(parents=True)
                path = source(made)
            shutil.copy(path, share / "files" / name)
    sticks = "".join(f"{s.var} {s.serial(i)}\n" for i, s in enumerate(boot.sticks)
                     if s.plugged)
    (share / "sticks").write_text(sticks)
    plugs = "".join(f"{s.var} {s.serial(i)}\n" for i, s in enumerate(boot.sticks)
                    if not s.plugged)
    (share / "plugs").write_text(plugs)
    env = {
        "MODULES": " ".join(boot.modules),
        "LIBVIRT": "1" if boot.libvirt else "0",
        "SAFEUSBD": "1" if boot.safeusbd else "0",
        "LIBVIRT_CONFIG": boot.libvirt_config,
        "SAFEUSB_CONFINEMENT": "1" if boot.safeusb_confinement else "0",
        "NESTED_DOMAIN": "1" if boot.nested_domain else "0",
        "SAFEUSB": str(SAFEUSB),
        "SAFEUSBD_CMD": str(VENV_BIN / "safeusbd"),
        "PYTHON": str(PYTHON),
        "REPO": str(REPO or ""),
        "GUEST_DIR": str(scenario_dir),  # the scenarios' own helpers are there
        "LAB_DIR": str(LAB_GUEST),
    }
    (share / "boot.env").write_text("".join(f"{k}='{v}'\n" for k, v in env.items()))


def _read_timings(share: Path) -> dict[str, float]:
    timings: dict[str, float] = {}
    p = share / "out" / "timings"
    if p.exists():
        for line in p.read_text().splitlines():
            key, _, value = line.rpartition(" ")
            try:
                timings[key] = float(value)
            except ValueError:
                continue
    return timings


def vng_command(boot: Boot, workdir: Path) -> list[str]:
    kernel = find_kernel(boot.kernel)
    if kernel is None:
        raise VmUnavailable(f"no Debian {boot.kernel} kernel in /boot with modules in "
                            f"/lib/modules (Debian package {_kernel_package(boot.kernel)}; "
                            f"scripts/setup-vm-tier installs it)")
    ports = max(4, len(boot.sticks) + len(boot.devices))
    qemu: list[str] = ["-device", f"qemu-xhci,id=xhci,p2={min(ports, 15)},p3={min(ports, 15)}"]
    for i, s in enumerate(boot.sticks):
        qemu += s.qemu_args(i, workdir / "img" / f"{s.name}.img")
    for d in boot.devices:
        qemu += d.qemu_args()
    qemu += ["-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off"]
    share = workdir / "share"
    return [
        _which("vng"), "--verbose", "--run", str(kernel), "--disable-kvm", "--disable-microvm",
        "--force-9p", "--memory", boot.memory, "--cpus", "2",
        # No KVM inside: the nested domain runs under TCG (g1.xml, type 'qemu'), and KVM on
        # the SVM that TCG emulates is one more thing a boot can hang in (libvirtd probes
        # /dev/kvm at its start, where two boots stopped for good, SysRq included).
        "--append", "module_blacklist=kvm,kvm_amd,kvm_intel",
        "--overlay-rwdir", "/etc", "--overlay-rwdir", "/var",
        *(a for d in boot.rw_overlays for a in ("--overlay-rwdir", d)),
        "--rwdir", str(share),
        f"--qemu-opts={' '.join(qemu)}",
        "--exec", f"bash {LAB_GUEST / 'driver.sh'} {share}",
    ]


#: Seconds from QEMU's start until the guest driver's first mark: a boot takes about 60 (2
#: cores, TCG), two side by side about twice that. A kernel that has not started the driver
#: by then has stopped in its own boot (seen: at 1.27 s of uptime, after "Switched to
#: clocksource hpet"), before anything of safeusb ran.
READY_WITHIN = 420


def run_boot(boot: Boot, scenario_dir: Path, workroot: Path | None = None,
             ready_within: float = READY_WITHIN) -> BootResult:
    """Build images and payloads, boot, run every scenario (its script from
    ``scenario_dir``), return once the VM is gone. A guest whose kernel never started
    the driver within ``ready_within`` seconds is killed and booted once more, afresh
    (``retried`` says so, with the first console's last lines); nothing of a boot that
    reached the driver is ever made again."""
    first = _boot_once(boot, scenario_dir, workroot, ready_within)
    if first.error is None or "driver_start" in first.timings:
        return first
    tail = " | ".join(first.console.splitlines()[-3:])
    why = f"{first.error}; its console ended: {tail}"
    if os.environ.get("SAFEUSB_VM_KEEP") != "1":
        shutil.rmtree(first.workdir, ignore_errors=True)
    else:
        why += f" (kept in {first.workdir})"
    print(f"[vm boot {boot.name}] booting again: {why}", file=sys.stderr, flush=True)
    again = _boot_once(boot, scenario_dir, workroot, ready_within)
    return replace(again, retried=why)


def _boot_once(boot: Boot, scenario_dir: Path, workroot: Path | None,
               ready_within: float) -> BootResult:
    names = [s.name for s in boot.sticks]
    if len(set(names)) != len(names):
        raise ValueError("stick names must be unique within a boot")
    workdir = Path(tempfile.mkdtemp(prefix=f"safeusb-vm-{boot.name}-", dir=workroot))
    share = workdir / "share"
    (share / "out").mkdir(parents=True)
    (workdir / "img").mkdir()
    for s in boot.sticks:
        s.image.build(workdir / "img" / f"{s.name}.img")
    sums = _make_payloads(share, boot)
    _write_plan(share, boot, scenario_dir)

    env = dict(os.environ, PATH=tool_path())
    argv = vng_command(boot, workdir)
    error: str | None = None
    start = time.monotonic()
    pulls = PullService(share / "out" / "pull", workdir / "qmp.sock",
                        {s.var: Stick.device_id(i) for i, s in enumerate(boot.sticks)})
    plugs = PlugService(share / "out" / "plug", workdir / "qmp.sock",
                        {s.var: s.device_add(i) for i, s in enumerate(boot.sticks)})
    with (workdir / "console.log").open("wb") as console:
        proc = subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=workdir,
                                start_new_session=True)
        pulls.start()
        plugs.start()
        rc: int | None = None
        try:
            while rc is None:
                try:
                    rc = proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    waited = time.monotonic() - start
                    if waited > boot.timeout:
                        error = f"the VM did not finish within {boot.timeout} s"
                    elif waited > ready_within and not (share / "out" / "timings").exists():
                        error = f"the guest did not start the driver within {ready_within:.0f} s"
                    else:
                        continue
                    _show_blocked_tasks(workdir / "qmp.sock")
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
        finally:
            pulls.stop()
            plugs.stop()
    wall = time.monotonic() - start
    if error is None and not (share / "out" / "done").exists():
        error = f"the guest driver did not finish (vng exit {rc})"
    return BootResult(boot=boot, workdir=workdir, rc=rc, wall_seconds=wall, error=error,
                      timings=_read_timings(share), payload_sums=sums)


def _show_blocked_tasks(qmp: Path) -> None:
    """Before a stuck VM is killed: SysRq-W (tasks in uninterruptible sleep, with their
    stacks) on the guest console, so the report says where it hung."""
    if qmp_commands(qmp, [{"execute": "human-monitor-command",
                           "arguments": {"command-line": "sendkey alt-sysrq-w"}}]) == "ok":
        time.sleep(5)


class _RequestService(threading.Thread):
    """Answers the guest's requests, each a file in ``requests`` (its name the request,
    without a dot), once each and in the order of their names: act(name) is written to
    ``NAME.done``."""

    def __init__(self, name: str, requests: Path, qmp: Path) -> None:
        super().__init__(name=name, daemon=True)
        self.requests = requests
        self.qmp = qmp
        self.halt = threading.Event()
        self.done: set[str] = set()
        requests.mkdir(parents=True, exist_ok=True)

    def act(self, name: str) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(timeout=5)

    def run(self) -> None:
        while not self.halt.wait(0.05):
            for req in sorted(self.requests.iterdir()):
                name = req.name
                if "." in name or name in self.done:
                    continue
                self.done.add(name)
                (self.requests / f"{name}.done").write_text(self.act(name) + "\n")


class PullService(_RequestService):
    """Pulls sticks out of the running VM when the guest asks: a scenario creates
    ``$SHARE/out/pull/NAME`` (the stick's variable name, e.g. ``DATA``) and this thread
    sends ``device_del`` for that stick to the outer QEMU's QMP monitor, as a user
    yanking it would. The answer goes to ``pull/NAME.done`` ("ok" or the error), which
    the guest need not wait for: it sees the USB device vanish."""

    def __init__(self, requests: Path, qmp: Path, device_ids: Mapping[str, str]) -> None:
        super().__init__("vm-pull", requests, qmp)
        self.device_ids = dict(device_ids)

    def act(self, name: str) -> str:
        dev = self.device_ids.get(name)
        if dev is None:
            return f"error: no stick {name}"
        return qmp_commands(self.qmp, [{"execute": "device_del", "arguments": {"id": dev}}])


def qmp_commands(qmp: Path, commands: Sequence[dict[str, Any]]) -> str:
    """Send each command to a QMP monitor in turn: "ok", or "error: ..." at the first
    that fails."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(qmp))
            stream = sock.makefile("rwb")
            json.loads(stream.readline())  # the greeting
            for cmd in ({"execute": "qmp_capabilities"}, *commands):
                stream.write(json.dumps(cmd).encode() + b"\n")
                stream.flush()
                while True:
                    msg = json.loads(stream.readline())
                    if "error" in msg:
                        return f"error: {msg['error'].get('desc')}"
                    if "return" in msg:
                        break
        return "ok"
    except (OSError, ValueError) as exc:
        return f"error: {exc}"


class PlugService(_RequestService):
    """Plugs sticks into the running VM and pulls them out, as often as the guest asks:
    a scenario creates ``$SHARE/out/plug/SEQ-ACTION-NAME`` (ACTION ``plug`` or ``pull``,
    NAME the stick's variable name, SEQ unique) and this thread sends ``device_add`` of
    the stick's usb-storage device (same drive, serial and id) or ``device_del`` to the
    outer QEMU's QMP monitor, in the order of the requests. The answer ("ok" or the
    error) goes to ``SEQ-ACTION-NAME.done``."""

    def __init__(self, requests: Path, qmp: Path,
                 devices: Mapping[str, Mapping[str, str]]) -> None:
        super().__init__("vm-plug", requests, qmp)
        self.devices = {k: dict(v) for k, v in devices.items()}

    def act(self, request: str) -> str:
        _seq, _, rest = request.partition("-")
        action, _, stick = rest.partition("-")
        device = self.devices.get(stick)
        if device is None or action not in ("plug", "pull"):
            return f"error: not a request: {request}"
        if action == "plug":
            # A device just deleted lets go of its node a moment after it left the bus:
            # until then device_add finds the node in use. Tried again for a while.
            deadline = time.monotonic() + 15
            while True:
                answer = qmp_commands(self.qmp, [{"execute": "device_add",
                                                  "arguments": device}])
                if answer == "ok" or ("in use" not in answer and "conflict" not in answer) \
                        or time.monotonic() > deadline:
                    return answer
                time.sleep(0.1)
        return qmp_commands(self.qmp, [{"execute": "device_del",
                                        "arguments": {"id": device["id"]}}])


def check_image(image: Path, expected: Mapping[str, tuple[str, int]], offset: int = 0,
                size: int | None = None) -> ImageCheck:
    """Replay the journal on a copy of ``image`` (a loop mount), compare checksums of
    ``expected`` files (path -> (sha256, size)), then ``e2fsck -fn`` the replayed copy."""
    with tempfile.TemporaryDirectory(prefix="safeusb-check-") as tmp:
        copy = Path(tmp) / "copy.img"
        _run(["cp", "--sparse=always", str(image), str(copy)])
        loop_argv = ["losetup", "--find", "--show", "--offset", str(offset)]
        if size is not None:
            loop_argv += ["--sizelimit", str(size)]
        loop = _run([*loop_argv, str(copy)]).strip()
        try:
            mnt = Path(tmp) / "mnt"
            mnt.mkdir()
            mount = subprocess.run([_which("mount"), "-t", "ext4", loop, str(mnt)],
                                   capture_output=True, text=True, check=False)
            mount_error = None
            if mount.returncode != 0:
                mount_error = mount.stderr.strip() or f"mount exit {mount.returncode}"
            states: list[FileState] = []
            if mount_error is None:
                try:
                    states = [_file_state(mnt, p, s, n) for p, (s, n) in expected.items()]
                finally:
                    _run(["umount", str(mnt)])
            else:
                states = [FileState(p, "missing", None, n) for p, (_, n) in expected.items()]
            fsck = subprocess.run([_which("e2fsck"), "-fn", loop], capture_output=True, text=True,
                                  check=False)
        finally:
            subprocess.run([_which("losetup"), "-d", loop], check=False)
    return ImageCheck(mount_error, fsck.returncode, fsck.stdout + fsck.stderr, tuple(states))


def _file_state(root: Path, path: str, sha: str, size: int) -> FileState:
    p = root / path.lstrip("/")
    if not p.is_file():
        return FileState(path, "missing", None, size)
    data = p.read_bytes()
    if len(data) < size:
        return FileState(path, "short", len(data), size)
    if hashlib.sha256(data).hexdigest() != sha:
        return FileState(path, "mismatch", len(data), size)
    return FileState(path, "ok", len(data), size)


class Runner:
    """Runs each :class:`Boot` once per pytest session and keeps its timings.

    Boots planned ahead (:meth:`plan`, from the collected test modules) run in the
    background, ``parallel`` at a time, in the order given; :meth:`run` waits for a
    planned boot's result, and runs any other boot at once. Every boot's scenario
    scripts are in ``scenario_dir``."""

    def __init__(self, keep: bool, scenario_dir: Path, parallel: int = 1) -> None:
        self.keep = keep
        self.scenario_dir = scenario_dir
        self.parallel = parallel
        self.results: dict[str, BootResult] = {}
        self._pool = (concurrent.futures.ThreadPoolExecutor(parallel, "vm-boot")
                      if parallel > 1 else None)
        self._planned: dict[str, concurrent.futures.Future[BootResult]] = {}
        self._slots = threading.Semaphore(parallel)
        self._whole = threading.Lock()  # taken while a boot that runs alone gathers slots

    def plan(self, boots: Sequence[Boot]) -> None:
        """Boots that run alone go first: while they run, the other threads wait."""
        if self._pool is None:
            return
        for boot in sorted(boots, key=lambda b: not b.alone):
            if boot.name not in self._planned and boot.name not in self.results:
                self._planned[boot.name] = self._pool.submit(self._run_planned, boot)

    def _run_planned(self, boot: Boot) -> BootResult:
        slots = self.parallel if boot.alone else 1
        with self._whole:
            for _ in range(slots):
                self._slots.acquire()
        try:
            return run_boot(boot, self.scenario_dir)
        finally:
            for _ in range(slots):
                self._slots.release()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """A boot's share of the machine for a VM started some other way (a command that
        boots one itself), so that no more run at once than planned."""
        with self._whole:
            self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()

    def run(self, boot: Boot) -> BootResult:
        if boot.name not in self.results:
            planned = self._planned.pop(boot.name, None)
            self.results[boot.name] = (planned.result() if planned
                                      else run_boot(boot, self.scenario_dir))
        return self.results[boot.name]

    def timing_lines(self) -> list[str]:
        lines = []
        for res in self.results.values():
            t = res.timings
            head = f"boot {res.boot.name}: {res.wall_seconds:.1f} s wall"
            if "driver_start" in t:
                head += f", guest ready at {t['driver_start']:.1f} s uptime"
            if "devices_ready" in t and "driver_start" in t:
                head += f", devices after {t['devices_ready'] - t['driver_start']:.1f} s"
            if "libvirtd_up" in t and "libvirt_start" in t:
                head += f", libvirtd up in {t['libvirtd_up'] - t['libvirt_start']:.1f} s"
            if "domain_started" in t and "libvirtd_up" in t:
                head += f", nested domain in {t['domain_started'] - t['libvirtd_up']:.1f} s"
            if res.error:
                head += f" [{res.error}]"
            if res.retried:
                head += f" [booted again: {res.retried}]"
            lines.append(head)
            for sc in res.boot.scenarios:
                a, b = t.get(f"scenario_start:{sc.name}"), t.get(f"scenario_end:{sc.name}")
                took = f"{b - a:.1f} s" if a is not None and b is not None else "did not run"
                lines.append(f"  {sc.name}: {took}")
        return lines

    def cleanup(self) -> None:
        if self._pool is not None:
            for future in self._planned.values():
                future.cancel()
            self._pool.shutdown(wait=True)  # a boot under way ends within its timeout
            for future in self._planned.values():
                if not future.cancelled() and future.exception() is None:
                    res = future.result()
                    self.results.setdefault(res.boot.name, res)
            self._planned.clear()
        if self.keep:
            return
        for res in self.results.values():
            shutil.rmtree(res.workdir, ignore_errors=True)
