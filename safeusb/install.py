"""Install the libvirt hook drop-in the way a distribution would."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import SafeUSBError, UsageError

TEMPLATE = Path(__file__).resolve().parent.parent / "libvirt_hooks" / "safeusb.in"
HOOK_DIR = "etc/libvirt/hooks/qemu.d"
HOOK_NAME = "safeusb"
MARK = "# safeusb: libvirt QEMU hook"


class InstallError(SafeUSBError):
    exit_code = 1


@dataclass(frozen=True)
class Installed:
    path: str
    changed: bool
    restart_needed: bool

    def describe(self, verb: str) -> str:
        text = f"{verb} {self.path}" if self.changed else f"{self.path}: already up to date"
        if self.changed and self.restart_needed:
            text += "; restart libvirtd (or send it SIGHUP) so it runs the hook"
        return text


def interpreter() -> str:
    """This interpreter's path, refused when it is a shim that would resolve at run time."""
    exe = sys.executable
    if not exe or not os.path.isabs(exe):
        raise InstallError("cannot tell which Python runs safeusb; give --python")
    if "/shims/" in exe or os.path.basename(os.path.dirname(exe)) == "shims":
        raise InstallError(f"{exe} is an environment shim; give --python with a fixed path")
    return exe


def render(python: str) -> str:
    if not os.path.isabs(python) or any(c in python for c in " \t\n'\"$`\\;|&<>"):
        raise UsageError(f"--python must be an absolute path without special characters: "
                         f"{python!r}")
    try:
        text = TEMPLATE.read_text()
    except OSError as exc:
        raise InstallError(f"hook template {TEMPLATE}: {exc.strerror or exc}") from None
    return text.replace("@PYTHON@", python)


def _libvirtd_running() -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                    if f.read().strip() in ("libvirtd", "virtqemud"):
                        return True
            except OSError:
                continue
    return False


def install(root: str = "/", python: str | None = None) -> Installed:
    content = render(python or interpreter())
    directory = os.path.join(root, HOOK_DIR)
    path = os.path.join(directory, HOOK_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            current: str | None = f.read()
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise InstallError(f"{path}: {exc.strerror or exc}") from None
    if current is not None and MARK not in current:
        raise InstallError(f"{path} exists and is not safeusb's hook; not overwriting it")
    if current == content and os.access(path, os.X_OK):
        return Installed(path, False, False)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(content)
    os.chmod(tmp, 0o755)  # noqa: S103 - libvirtd runs it; it holds no secret
    os.replace(tmp, path)
    # libvirtd looks for hooks when it starts (and on SIGHUP).
    return Installed(path, True, root == "/" and current is None and _libvirtd_running())


def uninstall(root: str = "/") -> Installed:
    path = os.path.join(root, HOOK_DIR, HOOK_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            if MARK not in f.read():
                raise InstallError(f"{path} is not safeusb's hook; not removing it")
    except FileNotFoundError:
        return Installed(path, False, False)
    os.unlink(path)
    return Installed(path, True, False)
