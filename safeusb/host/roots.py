"""The system roots safeusb reads: passed in everywhere, never module globals."""

from __future__ import annotations

import os
from dataclasses import dataclass

SYS = "/sys"
PROC = "/proc"
DEV = "/dev"
RUN = "/run"


@dataclass(frozen=True)
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
