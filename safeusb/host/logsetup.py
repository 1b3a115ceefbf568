"""Where log lines go: stderr, and syslog when acting. Light, so that commands that only
read import no acting code."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(stderr_level: int, to_syslog: bool, tag: str = "safeusb") -> None:
    """Log to stderr at the given level and, when acting, every action to syslog."""
    logger = logging.getLogger("safeusb")
    logger.setLevel(logging.INFO if to_syslog else stderr_level)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(stderr_level)
    err.setFormatter(logging.Formatter("safeusb: %(message)s"))
    logger.addHandler(err)
    if to_syslog and os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler  # noqa: PLC0415 (only when acting)

        try:
            syslog = SysLogHandler(address="/dev/log")
        except OSError:
            return
        syslog.setFormatter(logging.Formatter(tag + "[%(process)d]: %(message)s"))
        logger.addHandler(syslog)
