"""Exceptions. Every error safeusb raises derives from SafeUSBError; exit codes live here."""

from __future__ import annotations

EXIT_FREE = 0
EXIT_IN_USE = 1
EXIT_USAGE = 2


class SafeUSBError(Exception):
    """Root of every safeusb error."""

    exit_code = EXIT_USAGE


class UsageError(SafeUSBError):
    """Bad command-line usage."""


class SelectorError(SafeUSBError):
    """A selector that names no device, or names it badly."""

    def __init__(self, selector: str, message: str) -> None:
        super().__init__(f"{selector}: {message}")
        self.selector = selector


class NoSuchDevice(SelectorError):
    """The selector is well formed but nothing on the host matches it."""


class AmbiguousSelector(SelectorError):
    """The selector matches several devices."""

    def __init__(self, selector: str, candidates: tuple[str, ...]) -> None:
        listing = "; ".join(candidates)
        super().__init__(selector, f"matches {len(candidates)} devices: {listing}")
        self.candidates = candidates


class Refused(SafeUSBError):
    """The handover was refused (in use, by the policy) or could not be done safely."""

    exit_code = EXIT_IN_USE


class XMLError(SafeUSBError):
    """A libvirt XML document that cannot be read safely."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source


class LibvirtError(SafeUSBError):
    """libvirt refused or failed a call (attach-device, protect)."""

    exit_code = EXIT_IN_USE


class SystemReadError(SafeUSBError):
    """The system itself (sysfs, procfs) cannot be read at all."""

    exit_code = EXIT_IN_USE

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"cannot read {path}: {message}")
        self.path = path


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception that reached the top."""
    if isinstance(exc, SafeUSBError):
        return exc.exit_code
    return EXIT_IN_USE
