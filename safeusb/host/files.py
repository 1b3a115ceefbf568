"""Files safeusb installs on the host (the libvirt hook, its AppArmor rules, udev rules, the
gate's launcher) and the commands that make their programs read them again: read without
following a symlink, written whole through a new file beside them (never half a file,
never through a symlink), each change logged; and whether a program's socket is there."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import tempfile
from collections.abc import Callable, Sequence

log = logging.getLogger("safeusb")


def is_socket(path: str) -> bool:
    """Whether a program listens at ``path`` (a UNIX socket is there)."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def read_text(path: str) -> str | None:
    """The file's text; None when it does not exist. A symlink is refused (OSError)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with open(fd, encoding="utf-8") as f:
        return f.read()


def write_text(path: str, text: str, mode: int = 0o644,
               check_directory: Callable[[str], object] | None = None) -> None:
    """Replace ``path`` by a file holding ``text``, made beside it and renamed over it;
    ``check_directory`` may refuse the directory (raise) before anything is written."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    if check_directory is not None:
        check_directory(directory)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    log.info("wrote %s", path)


def symlink(link: str, target: str) -> None:
    """Make ``link`` a symlink to ``target``, replacing what was there in one rename."""
    os.makedirs(os.path.dirname(link), mode=0o755, exist_ok=True)
    tmp = f"{link}.{os.getpid()}.tmp"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    log.info("linked %s -> %s", link, target)


def remove(path: str) -> None:
    os.unlink(path)
    log.info("removed %s", path)


def command(argv: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a program (an argument list, never a shell) and return what it said; OSError or
    TimeoutExpired when it could not run to its end."""
    log.info("running %s", " ".join(argv))
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)
