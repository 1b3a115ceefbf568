"""Real-kernel (VM) tier: shared runner, prerequisites, marker and timings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from safeusb.lab.harness import SAFEUSB, Boot, Runner, missing_prerequisites

from . import GUEST_DIR

_RUNNER_KEY = pytest.StashKey[Runner]()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: boots a real Debian kernel under QEMU with emulated USB devices")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tier, and order the session: unit tests, then this tier (whose boots run
    in the background from the end of collection), then the host and package tiers, so
    that their races on this machine's kernel never share the cores with a boot."""
    here = os.path.dirname(__file__)
    unit = os.path.join(os.path.dirname(here), "unit") + os.sep

    def rank(item: pytest.Item) -> int:
        path = str(item.path)
        return 0 if path.startswith(unit) else 1 if path.startswith(here + os.sep) else 2

    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(pytest.mark.vm)
    items.sort(key=rank)  # stable: each tier keeps its own order


def unavailable(reason: str) -> None:
    """Skip, or under CI=true fail: CI must run the VM tier."""
    if in_ci():
        pytest.fail(f"VM tier cannot run in CI: {reason} (run scripts/setup-vm-tier)",
                    pytrace=False)
    pytest.skip(f"VM tier cannot run: {reason} (run scripts/setup-vm-tier)")


def _parallel() -> int:
    """Boots at a time: SAFEUSB_VM_PARALLEL, default 1. Two at a time on two cores was
    measured slower in all (tests/vm/README). A boot marked ``alone`` runs with no other
    beside it even then."""
    try:
        return max(1, int(os.environ.get("SAFEUSB_VM_PARALLEL", "1")))
    except ValueError:
        return 1


def _new_runner(config: pytest.Config) -> Runner:
    runner = config.stash.get(_RUNNER_KEY, None)
    if runner is None:
        runner = Runner(keep=bool(os.environ.get("SAFEUSB_VM_KEEP")), scenario_dir=GUEST_DIR,
                        parallel=_parallel())
        config.stash[_RUNNER_KEY] = runner
    return runner


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the selected modules' boots (module-level Boot objects) in the background,
    in collection order; each module's fixture then waits for its own."""
    here = os.path.dirname(__file__)
    modules: list[Any] = []
    for item in session.items:
        module = getattr(item, "module", None)
        if (module is not None and str(item.path).startswith(here + os.sep)
                and module not in modules):
            modules.append(module)
    boots = [value for m in modules for value in vars(m).values() if isinstance(value, Boot)]
    if boots and not missing_prerequisites() and not session.config.option.collectonly:
        _new_runner(session.config).plan(boots)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Boots planned for modules whose tests never asked for them end here too."""
    runner = session.config.stash.get(_RUNNER_KEY, None)
    if runner is not None:
        runner.cleanup()


@pytest.fixture(scope="session")
def vm_runner(pytestconfig: pytest.Config) -> Iterator[Runner]:
    missing = missing_prerequisites()
    if missing:
        unavailable("; ".join(missing))
    runner = _new_runner(pytestconfig)
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
