"""Real-kernel (VM) tier: shared runner, prerequisites, marker and timings."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .harness import SAFEUSB, Runner, missing_prerequisites

_RUNNER_KEY = pytest.StashKey[Runner]()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: boots a real Debian kernel under QEMU with emulated USB devices")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(pytest.mark.vm)


def unavailable(reason: str) -> None:
    """Skip, or under CI=true fail: CI must run the VM tier."""
    if in_ci():
        pytest.fail(f"VM tier cannot run in CI: {reason} (run scripts/setup-vm-tier)",
                    pytrace=False)
    pytest.skip(f"VM tier cannot run: {reason} (run scripts/setup-vm-tier)")


@pytest.fixture(scope="session")
def vm_runner(pytestconfig: pytest.Config) -> Iterator[Runner]:
    missing = missing_prerequisites()
    if missing:
        unavailable("; ".join(missing))
    runner = Runner(keep=bool(os.environ.get("SAFEUSB_VM_KEEP")))
    pytestconfig.stash[_RUNNER_KEY] = runner
    yield runner
    runner.cleanup()


@pytest.fixture(scope="session")
def safeusb_cli() -> str:
    """The CLI run inside the guest; scenarios that need it skip without it."""
    if not SAFEUSB.exists():
        unavailable(f"{SAFEUSB} is absent (the project is not installed in .venv)")
    return str(SAFEUSB)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    here = os.path.dirname(__file__)
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if str(getattr(r, "fspath", "")).startswith(here)
               or "tests/vm/" in getattr(r, "nodeid", "")]
    if skipped:
        terminalreporter.section("VM TIER NOT RUN", sep="!", red=True, bold=True)
        reasons = sorted({(str(r.longrepr[2]) if isinstance(r.longrepr, tuple)
                           else str(r.longrepr)).removeprefix("Skipped: ")
                          for r in skipped})
        terminalreporter.write_line(f"{len(skipped)} real-kernel test(s) skipped:", red=True)
        for reason in reasons:
            terminalreporter.write_line(f"  {reason}", red=True)
    runner = config.stash.get(_RUNNER_KEY, None)
    if runner is None or not runner.results:
        return
    terminalreporter.section("VM tier timings")
    for line in runner.timing_lines():
        terminalreporter.write_line(line)
    if runner.keep:
        for res in runner.results.values():
            terminalreporter.write_line(f"kept {res.workdir}")
