"""The system roots safeusb reads: passed in everywhere, never module globals."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import Any, TypeVar

from safeusb.values import frozen

T = TypeVar("T")

SYS = "/sys"
PROC = "/proc"
DEV = "/dev"
RUN = "/run"


class ParseMemo:
    """What a pure parser made of the text last read at a key (a namespace's mount table),
    handed out again while the key's text is byte for byte the same: the text is read
    every time, only its parse is spared. A long-lived reader (safeusbd) gains; what it
    holds is bounded by the keys it still reads (``keep``)."""

    def __init__(self) -> None:
        self._last: dict[Any, tuple[str, Any]] = {}
        self._lock = threading.Lock()

    def parse(self, key: object, text: str, parser: Callable[[str], T]) -> T:
        with self._lock:
            last = self._last.get(key)
        if last is not None and last[0] == text:
            return last[1]  # type: ignore[no-any-return]
        value = parser(text)
        with self._lock:
            self._last[key] = (text, value)
        return value

    def keep(self, keys: Iterable[object]) -> None:
        """Forget every key but these."""
        alive = set(keys)
        with self._lock:
            for key in [k for k in self._last if k not in alive]:
                del self._last[key]


class QuietMemo:
    """Readings of the device tree kept while the kernel sends no uevent. Every device
    added, removed, renamed, changed, bound to a driver or unbound counts one in
    /sys/kernel/uevent_seqnum: while that count stands, the devices, their nodes and their
    drivers stand. What sysfs can show without a uevent (a holder's link before its table
    is live, a loop device's flags) is read afresh by the callers where it matters. Where
    the count cannot be read (a recording), nothing is kept."""

    def __init__(self) -> None:
        self._count: int | None = None
        self._values: dict[Any, Any] = {}
        self._lock = threading.Lock()

    @staticmethod
    def count(path: str) -> int | None:
        try:
            with open(path, "rb") as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def read(self, count_path: str, key: object, reader: Callable[[], T]) -> tuple[T, bool]:
        """reader()'s value for ``key``, and whether it was kept from an earlier read (no
        uevent since; a value read while one came is not kept)."""
        before = self.count(count_path)
        if before is not None:
            with self._lock:
                if self._count == before and key in self._values:
                    return self._values[key], True
        value = reader()
        if before is not None and self.count(count_path) == before:
            with self._lock:
                if self._count != before:
                    self._count, self._values = before, {}
                self._values[key] = value
        return value, False


@frozen
class Roots:
    """Where sysfs, procfs, /dev and debugfs are.

    ``Roots.host()`` is the running system; a recorded tree passes its own
    directories, so the same code reads fixtures in tests.
    """

    sys: str = SYS
    proc: str = PROC
    dev: str = DEV
    debugfs: str = SYS + "/kernel/debug"
    live: bool = True
    # parses kept between reads through these roots (never part of what they name)
    memo: ParseMemo = field(default_factory=ParseMemo, compare=False, repr=False)
    # other readers' caches kept between reads through these roots, by the reader's name
    # (modeswitch.switch_db's database); a long-lived reader keeps one Roots
    kept: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # sysfs readings kept until the kernel's next uevent
    quiet: QuietMemo = field(default_factory=QuietMemo, compare=False, repr=False)

    @classmethod
    def host(cls) -> Roots:
        return cls()

    @classmethod
    def from_recording(cls, directory: str) -> Roots:
        """Roots of a tree recorded by tools/record-fixtures (sys/, proc/, debug/)."""
        return cls(
            sys=os.path.join(directory, "sys"),
            proc=os.path.join(directory, "proc"),
            dev=os.path.join(directory, "dev"),
            debugfs=os.path.join(directory, "debug"),
            live=False,
        )

    @property
    def own_kernel(self) -> bool:
        """Whether these are this host's own sysfs and procfs, where its kernel and its
        services answer (the kernel guard, BPF programs, safeusbd), and not a recording
        or a built tree."""
        return self.live and self.sys == SYS and self.proc == PROC

    def uevent_count(self) -> int | None:
        """How many uevents the kernel has sent (None where it cannot be read)."""
        return QuietMemo.count(self.sys_path("kernel", "uevent_seqnum"))

    def read_quietly(self, key: object, reader: Callable[[], T]) -> tuple[T, bool]:
        """reader()'s value, kept from an earlier read while no uevent came since
        (QuietMemo); and whether it was."""
        return self.quiet.read(self.sys_path("kernel", "uevent_seqnum"), key, reader)

    def sys_path(self, *parts: str) -> str:
        return os.path.join(self.sys, *parts)

    def proc_path(self, *parts: str) -> str:
        return os.path.join(self.proc, *parts)

    def dev_path(self, host_path: str) -> str:
        """Map a host path under /dev to this root's /dev."""
        rel = os.path.relpath(os.path.normpath(host_path), "/dev")
        return os.path.join(self.dev, rel)

    def to_host_sys(self, path: str) -> str:
        """A path inside this sys root, spelled as on the host (/sys/...)."""
        return "/sys/" + os.path.relpath(path, self.sys)
