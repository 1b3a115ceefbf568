"""Install the libvirt hook drop-in the way a distribution would."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from safeusb import trust
from safeusb.errors import SafeUSBError, UsageError
from safeusb.host import files
from safeusb.host.journal import DEFAULT_DIR as STATE_DIR
from safeusb.values import frozen

TEMPLATE = Path(__file__).resolve().parent / "libvirt_hook.in"
HOOK_DIR = "etc/libvirt/hooks/qemu.d"
HOOK_NAME = "safeusb"
MARK = "# safeusb: libvirt QEMU hook"


class InstallError(SafeUSBError):
    exit_code = 1


@frozen
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


_BOOT_MAIN = """
PACKAGE = {package!r}
CODE_DIRS = {code_dirs!r}


def boot():
    try:
        check_code(sys.executable, [p for p in sys.path if p] + CODE_DIRS, [PACKAGE])
    except (Untrusted, OSError) as exc:
        print(f"safeusb: refusing to run code that others can change: {{exc}}",
              file=sys.stderr)
        return 4
    sys.path.extend(d for d in CODE_DIRS if d not in sys.path)
    if sys.argv[1:] == ["--check"]:
        import safeusb.hook
        return 0 if safeusb.hook.__file__.startswith(PACKAGE + "/") else 4
    from safeusb.hook import main
    return main()


sys.exit(boot())
"""


def code_dirs(sites: list[str] | None = None) -> tuple[str, list[str]]:
    """This safeusb's package directory, and the directories the hook imports from: the
    one holding the package, then those of its dependencies (where this Python has them).
    With ``sites`` (packaging: the target system's directories, the first holding
    safeusb), those directories as given."""
    if sites:
        for site in sites:
            if not os.path.isabs(site) or site != os.path.normpath(site):
                raise UsageError(f"--site must be a normalized absolute path: {site!r}")
        return os.path.join(sites[0], "safeusb"), list(dict.fromkeys(sites))
    package = os.path.dirname(os.path.abspath(__file__))
    dirs = [os.path.dirname(package)]
    for name in ("lxml", "pyroute2", "libvirt"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not os.path.isabs(spec.origin):
            continue
        where = os.path.dirname(spec.origin)
        if spec.submodule_search_locations is not None:
            where = os.path.dirname(where)
        if where not in dirs:
            dirs.append(where)
    return package, dirs


def boot_source(package: str, dirs: list[str]) -> str:
    """The Python the drop-in runs (-I -S): the trust check, then the hook."""
    source = Path(trust.__file__).read_text(encoding="utf-8")
    main = _BOOT_MAIN.format(package=package, code_dirs=dirs)
    text = "import sys\n" + source.replace("from __future__ import annotations\n", "") + main
    if "\nSAFEUSB_BOOT\n" in f"\n{text}\n":
        raise InstallError("the hook's Python would end its own here-document")
    return text


_SPECIAL = " \t\n'\"$`\\;|&<>*?[]{}~#"


def render(python: str, boot: str | None = None, removable: str | None = None) -> str:
    """The drop-in's text. ``removable`` (a packaged drop-in: the package directory) makes
    it do nothing once that directory's hook module is gone: a package's conffile stays
    after the package is removed, until it is purged (as Debian policy has init scripts
    and cron files do)."""
    if not os.path.isabs(python) or any(c in python for c in _SPECIAL):
        raise UsageError(f"--python must be an absolute path without special characters: "
                         f"{python!r}")
    guard = ""
    if removable is not None:
        if not os.path.isabs(removable) or any(c in removable for c in _SPECIAL):
            raise UsageError(f"--site must be an absolute path without special characters: "
                             f"{removable!r}")
        guard = ("# Installed by a package: once the package is removed (this file stays until\n"
                 "# it is purged), do nothing.\n"
                 f"[ -f {removable}/hook.py ] || exit 0\n")
    if boot is None:
        boot = boot_source(*code_dirs())
    try:
        text = TEMPLATE.read_text()
    except OSError as exc:
        raise InstallError(f"hook template {TEMPLATE}: {exc.strerror or exc}") from None
    return (text.replace("@PYTHON@", python).replace("@STATE_DIR@", STATE_DIR)
            .replace("@IF_REMOVED@", guard).replace("@BOOT@", boot))


def verify(python: str, boot: str) -> None:
    """Run the drop-in's Python in check mode: its interpreter and code are root's alone,
    and it imports this safeusb."""
    try:
        proc = subprocess.run([python, "-I", "-S", "-c", boot, "--check"], capture_output=True,
                              text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{python}: {getattr(exc, 'strerror', None) or exc}") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise InstallError(f"the hook cannot run with {python}: "
                           f"{lines[-1] if lines else f'exit status {proc.returncode}'}")


def _libvirtd_running() -> bool:
    from safeusb.host.procfs import any_running  # noqa: PLC0415
    from safeusb.host.roots import Roots  # noqa: PLC0415

    return any_running(Roots.host(), ("libvirtd", "virtqemud"))


def install(root: str = "/", python: str | None = None, check: bool | None = None,
            sites: list[str] | None = None) -> Installed:
    """Write the drop-in under root; on the real system (or with check) first prove that
    its Python runs the hook from code only root can change. ``sites``: render it for a
    package (see code_dirs and render)."""
    python = python or interpreter()
    package, dirs = code_dirs(sites)
    boot = boot_source(package, dirs)
    content = render(python, boot, removable=package if sites else None)
    if check or (check is None and root == "/"):
        verify(python, boot)
    directory = os.path.join(root, HOOK_DIR)
    path = os.path.join(directory, HOOK_NAME)
    try:
        current = files.read_text(path)
    except OSError as exc:
        raise InstallError(f"{path}: {exc.strerror or exc}") from None
    if current is not None and MARK not in current:
        raise InstallError(f"{path} exists and is not safeusb's hook; not overwriting it")
    if current == content and os.access(path, os.X_OK):
        return Installed(path, False, False)
    try:
        # libvirtd runs it; it holds no secret
        files.write_text(path, content, mode=0o755,
                         check_directory=trust.check_path if root == "/" else None)
    except trust.Untrusted as exc:
        raise InstallError(f"not installing into a directory others can change: {exc}") \
            from None
    except OSError as exc:
        raise InstallError(f"{directory}: {exc.strerror or exc}") from None
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
    files.remove(path)
    return Installed(path, True, False)
