"""safeusb's AppArmor rules in libvirt's confinement (Debian, Ubuntu).

Two site-local parts of libvirt's own profiles carry them, each as one marked block:
`local/abstractions/libvirt-qemu`, which every domain's profile includes (the gate,
Python and safeusb's modules read-only, safeusbd's socket), and `local/usr.sbin.libvirtd`
(libvirtd may run the gate when it probes the emulator). The rules name this
installation's paths; `apparmor/` in the source holds them as rendered for an
installation into the system's Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from safeusb.errors import SafeUSBError
from safeusb.host import files, sysfs
from safeusb.host.defaults import SOCKET
from safeusb.host.roots import Roots
from safeusb.install import Installed, code_dirs
from safeusb.values import frozen

PROG = "safeusb-qemu-gate"
APPARMOR_DIR = "etc/apparmor.d"
QEMU_LOCAL = "local/abstractions/libvirt-qemu"
LIBVIRTD_LOCAL = "local/usr.sbin.libvirtd"
LIBVIRTD_PROFILE = "usr.sbin.libvirtd"
BEGIN = "# >>> safeusb (safeusb install-confinement; do not edit inside)"
END = "# <<< safeusb"
SYSTEM_PREFIXES = ("/usr/bin/", "/usr/local/bin/", "/usr/lib/python3", "/usr/local/lib/python3")

QEMU_RULES = """\
  # safeusb's gate under libvirt's AppArmor confinement of QEMU.
  # The launcher: `safeusb protect` makes a domain's <emulator>
  # /usr/local/lib/safeusb/gate/<real emulator path>, a symlink to the gate program,
  # which then runs the real emulator (allowed as /usr/bin/qemu-system-* rmix).
  /usr/local/lib/safeusb/gate/ r,
  /usr/local/lib/safeusb/gate/** rix,
  /usr/{,local/}bin/safeusb-qemu-gate rix,

  # The Python interpreter the gate's first line names, in this profile (ix).
  /usr/bin/python3{,.[0-9]*} rix,
  /etc/python3{,.[0-9]*}/** r,

  # The standard library and safeusb's modules: read only, never written (no bytecode
  # caches either, so nothing QEMU's user writes is ever run by another domain).
  /usr/lib/python3{,.[0-9]*}/ r,
  /usr/lib/python3{,.[0-9]*}/** r,
  /usr/local/lib/python3{,.[0-9]*}/ r,
  /usr/local/lib/python3{,.[0-9]*}/** r,
  deny /usr/lib/python3{,.[0-9]*}/** w,
  deny /usr/local/lib/python3{,.[0-9]*}/** w,

  # What the gate reads of itself: its open descriptors (the fds libvirt passes in
  # add-fd are told apart by what they point to).
  owner @{PROC}/@{pid}/fd/ r,

  # The proxy's private socket to QEMU's monitor, in a directory of its own.
  owner /{,var/}tmp/safeusb-gate-*/ rw,
  owner /{,var/}tmp/safeusb-gate-*/monitor.sock rw,
  unix (create, bind, listen, accept, connect, send, receive, getattr, getopt, setopt,
        shutdown) type=stream,

  # Asking safeusbd, which decides (it runs as root, unconfined).
  @SOCKET@ rw,
  unix (connect, send, receive) type=stream peer=(label=unconfined),
""".replace("@SOCKET@", SOCKET)

LIBVIRTD_RULES = """\
  # libvirtd probes a protected domain's emulator: the gate, which runs the real one.
  /usr/local/bin/safeusb-qemu-gate PUx,
"""


class ConfinementError(SafeUSBError):
    exit_code = 1


@frozen
class Paths:
    """Where this installation's gate, interpreter and code live."""

    gate: str
    python: str
    read_only: tuple[str, ...]

    @classmethod
    def of_this_installation(cls) -> Paths:
        gate = os.path.realpath(os.path.join(os.path.dirname(sys.executable), PROG))
        package, dirs = code_dirs()
        ro = [os.path.realpath(d) for d in (sys.prefix, os.path.dirname(package), *dirs)]
        return cls(gate, os.path.realpath(sys.executable), tuple(dict.fromkeys(ro)))


def _specific(paths: Paths) -> tuple[list[str], list[str]]:
    """Rules for paths the general ones do not cover (a virtual environment, a checkout)."""
    qemu: list[str] = []
    libvirtd: list[str] = []
    if not paths.gate.startswith(("/usr/bin/", "/usr/local/bin/")):
        qemu.append(f"  {_quote(paths.gate)} rix,")
    if not paths.gate.startswith("/usr/bin/"):  # libvirtd's profile: /usr/bin/* PUx
        libvirtd.append(f"  {_quote(paths.gate)} PUx,")
    if not paths.python.startswith("/usr/bin/"):
        qemu.append(f"  {_quote(paths.python)} rix,")
    for d in paths.read_only:
        if d == "/" or d.startswith(SYSTEM_PREFIXES[2:]):
            continue
        qemu += [f"  {_quote(d, '/')} r,", f"  {_quote(d, '/**')} r,",
                 f"  deny {_quote(d, '/**')} w,"]
    return qemu, libvirtd


def _quote(path: str, glob: str = "") -> str:
    """path as a literal in a rule (pattern characters escaped), then glob."""
    if any(c in path for c in '"\n\0\\'):
        raise ConfinementError(f"{path!r}: a path AppArmor rules cannot name")
    literal = "".join(f"\\{c}" if c in "*?[]{}^" else c for c in path) + glob
    return f'"{literal}"' if any(c in path for c in " \t,#") else literal


def render(paths: Paths | None) -> dict[str, str]:
    """The two blocks, by file below /etc/apparmor.d; with paths, this installation's."""
    qemu, libvirtd = _specific(paths) if paths else ([], [])
    extra = "  # This installation.\n" + "\n".join(qemu) + "\n" if qemu else ""
    extra_d = "\n".join(libvirtd) + "\n" if libvirtd else ""
    return {QEMU_LOCAL: QEMU_RULES + extra, LIBVIRTD_LOCAL: LIBVIRTD_RULES + extra_d}


def _block(body: str) -> str:
    return f"{BEGIN}\n{body}{END}\n"


def _replace_block(text: str, body: str | None) -> str:
    """text with safeusb's block replaced by body (removed when None)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    inside = False
    for line in lines:
        if line.rstrip("\n") == BEGIN:
            inside = True
            continue
        if inside:
            if line.rstrip("\n") == END:
                inside = False
            continue
        out.append(line)
    if inside:
        raise ConfinementError(f"an unfinished safeusb block (no {END!r} line); fix it by hand")
    kept = "".join(out)
    if body is None:
        return kept
    if kept and not kept.endswith("\n"):
        kept += "\n"
    return kept + _block(body)


def _read(path: str) -> str:
    try:
        return files.read_text(path) or ""
    except OSError as exc:
        raise ConfinementError(f"{path}: {exc.strerror or exc}") from None


def _apply(root: str, blocks: dict[str, str | None]) -> list[Installed]:
    changes = []
    for rel, body in blocks.items():
        path = os.path.join(root, APPARMOR_DIR, rel)
        current = _read(path)
        new = _replace_block(current, body)
        if new == current:
            changes.append(Installed(path, False, False))
            continue
        try:
            files.write_text(path, new)
        except OSError as exc:
            raise ConfinementError(f"{path}: {exc.strerror or exc}") from None
        changes.append(Installed(path, True, False))
    return changes


def reload_libvirtd_profile(root: str = "/") -> str | None:
    """Load libvirtd's profile again (it includes the local part); None when done, else
    what stands in the way. Domains' profiles take the rules at their next start."""
    profile = os.path.join(root, APPARMOR_DIR, LIBVIRTD_PROFILE)
    if not os.path.exists(profile):
        return f"{profile} is not installed"
    try:
        proc = files.command(["apparmor_parser", "-r", profile])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apparmor_parser: {getattr(exc, 'strerror', None) or exc}"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return f"apparmor_parser -r {profile}: {lines[-1] if lines else proc.returncode}"
    return None


def install(root: str = "/", paths: Paths | None = None,
            reload: bool | None = None) -> list[str]:
    """Put safeusb's blocks in place; the lines to print."""
    blocks: dict[str, str | None] = dict(render(paths or Paths.of_this_installation()))
    changes = _apply(root, blocks)
    lines = [c.describe("installed safeusb's rules in") for c in changes]
    if (reload if reload is not None else root == "/") and any(c.changed for c in changes):
        if apparmor_enabled():
            problem = reload_libvirtd_profile(root)
            lines.append(f"libvirtd's profile not reloaded: {problem}" if problem
                         else "reloaded libvirtd's AppArmor profile")
        lines.append("running domains take the rules at their next start")
    return lines


def uninstall(root: str = "/") -> list[str]:
    changes = _apply(root, {QEMU_LOCAL: None, LIBVIRTD_LOCAL: None})
    return [c.describe("removed safeusb's rules from") for c in changes]


def installed(root: str = "/") -> bool:
    """safeusb's block is in the domains' abstraction."""
    return BEGIN in _read(os.path.join(root, APPARMOR_DIR, QEMU_LOCAL)).splitlines()


def apparmor_enabled(roots: Roots | None = None) -> bool:
    """Whether the kernel runs AppArmor."""
    return sysfs.apparmor_enabled(roots or Roots.host())


def libvirt_security_models(capabilities_xml: bytes) -> tuple[str, ...]:
    """The security drivers libvirt confines QEMU with, from its capabilities."""
    from safeusb.hostdev import parse_xml  # noqa: PLC0415

    root = parse_xml(capabilities_xml, "libvirt's capabilities")
    return tuple((m.text or "").strip() for m in root.iterfind("host/secmodel/model"))


def advice(models: Sequence[str], root: str = "/") -> tuple[str | None, list[str]]:
    """(a refusal, notes) for protecting a domain confined by these security drivers."""
    notes: list[str] = []
    if "apparmor" in models:
        if not installed(root):
            return ("libvirt confines QEMU with AppArmor and safeusb's rules are not "
                    "installed, so the gate could not run: run `safeusb "
                    "install-confinement` first; nothing was changed"), notes
        notes.append(f"AppArmor: safeusb's rules are in "
                     f"{os.path.join(root, APPARMOR_DIR, QEMU_LOCAL)}")
    if "selinux" in models:
        notes.append("SELinux: the gate needs safeusb's policy module (selinux/safeusb.te: "
                     "checkmodule, semodule_package, semodule -i; see the README)")
    return None, notes
