"""Whether root may run or obey a file: only if nobody but its trusted owners can change it.

A path is trusted when every component from / down to it, and every symlink on the way
with what it points to, is owned by a trusted user (root, by default) and writable by
nobody else: not by its group, not by others. A world-writable directory with the sticky
bit (/tmp) is passed through only to an entry a trusted user owns, which nobody else can
rename or remove there. A directory checked with ``recursive`` has each entry below it
checked the same way.

This module uses the standard library alone: `safeusb install-hook` copies its source
into the libvirt hook drop-in, which runs it before importing anything else of safeusb.
"""

from __future__ import annotations

import os
import stat

MAX_SYMLINKS = 40


class Untrusted(Exception):
    """A path that someone other than its trusted owners can change; the message says
    which component and why."""


def _who(uid: int) -> str:
    try:
        import pwd  # noqa: PLC0415

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _check_one(path: str, st: os.stat_result, owners: frozenset[int]) -> None:
    if st.st_uid not in owners:
        raise Untrusted(f"{path} is owned by {_who(st.st_uid)}")
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode) or not mode & 0o022:
        return
    if stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX:
        return  # sticky: the next component's owner is what counts, and it is checked
    who = "its group and others" if mode & 0o022 == 0o022 else \
        "its group" if mode & 0o020 else "others"
    raise Untrusted(f"{path} is writable by {who} (mode {mode:04o})")


def _resolve(path: str, owners: frozenset[int], hops: list[int]) -> str:
    """Check every component of an absolute path, following symlinks; the real path."""
    if not os.path.isabs(path):
        raise Untrusted(f"{path} is not an absolute path")
    current = "/"
    _check_one("/", os.lstat("/"), owners)
    for part in [p for p in path.split("/") if p and p != "."]:
        if part == "..":
            current = os.path.dirname(current)
            continue
        nxt = os.path.join(current, part)
        try:
            st = os.lstat(nxt)
        except OSError as exc:
            raise Untrusted(f"{nxt}: {exc.strerror or exc}") from None
        _check_one(nxt, st, owners)
        if stat.S_ISLNK(st.st_mode):
            hops[0] += 1
            if hops[0] > MAX_SYMLINKS:
                raise Untrusted(f"{path}: too many symlinks")
            target = os.readlink(nxt)
            current = _resolve(target if os.path.isabs(target)
                               else os.path.join(current, target), owners, hops)
        else:
            current = nxt
    return current


def check_path(path: str, owners: frozenset[int] = frozenset({0}),
               recursive: bool = False) -> str:
    """The real path of a trusted path; Untrusted says why it is not."""
    real = _resolve(os.path.abspath(path), owners, [0])
    if recursive and os.path.isdir(real):
        for top, dirs, files in os.walk(real, onerror=_walk_error):
            for name in dirs + files:
                entry = os.path.join(top, name)
                try:
                    st = os.lstat(entry)
                except OSError as exc:
                    raise Untrusted(f"{entry}: {exc.strerror or exc}") from None
                _check_one(entry, st, owners)
                if stat.S_ISLNK(st.st_mode):
                    check_path(entry, owners)
    return real


def _walk_error(exc: OSError) -> None:
    raise Untrusted(f"{exc.filename}: {exc.strerror or exc}")


def check_code(executable: str, code_dirs: list[str], packages: list[str]) -> None:
    """Root may run this interpreter with these directories on its path: the interpreter
    and its standard library, each directory, and each package directory in full."""
    check_path(executable)
    for d in code_dirs:
        if os.path.exists(d):
            check_path(d)
    for p in packages:
        check_path(p, recursive=True)


def trusted_owners() -> frozenset[int]:
    """Root, and the user running (whose own files bind only itself)."""
    return frozenset({0, os.geteuid()})
