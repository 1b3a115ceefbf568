"""The one place that changes the system: every command is logged, argument lists only."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger("safeusb")

_TOOL_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


class CommandFailed(Exception):
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
    raise FileNotFoundError(f"{name} not found in {', '.join(_TOOL_DIRS)}")


@dataclass
class Runner:
    """Executes commands and logs each one. ``dry_run`` logs without executing."""

    dry_run: bool = False

    def run(self, argv: Sequence[str], timeout: float | None = 60) -> str:
        if not argv or not os.path.isabs(argv[0]):
            raise ValueError(f"command must start with an absolute path: {argv!r}")
        log.info("run: %s", " ".join(argv))
        if self.dry_run:
            return ""
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stderr)
        return proc.stdout

    def mount_debugfs(self, target: str) -> None:
        self.run([tool("mount"), "-t", "debugfs", "debugfs", target])
