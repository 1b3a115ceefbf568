"""Shared test configuration: tiers and their honest skip reasons."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.packaging import Packages

# Timings never decide a test here: machines are shared and noisy.
settings.register_profile("safeusb", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("safeusb")

ROOT = Path(__file__).resolve().parent.parent
_PACKAGES_KEY = pytest.StashKey[Packages]()
SAFEUSB = ROOT / ".venv" / "bin" / "safeusb"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "host: needs root and real host kernel objects")
    config.addinivalue_line("markers", "hostile: bad or malicious input")
    config.addinivalue_line("markers", "fault: an injected failure")
    config.addinivalue_line("markers", "race: concurrent actors")
    config.addinivalue_line("markers", "package: builds the .deb, wheel, sdist and RPMs")


def require_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("host-kernel tests must run as root in CI")
        pytest.skip("host-kernel tests need root (loop devices, mounts, namespaces)")


@pytest.fixture(scope="session")
def packages(pytestconfig: pytest.Config) -> Iterator[Packages]:
    """The packages built from this checkout (tests/packaging.py), each on first use."""
    built = Packages()
    pytestconfig.stash[_PACKAGES_KEY] = built
    yield built
    if not os.environ.get("SAFEUSB_VM_KEEP"):
        built.cleanup()


@pytest.fixture
def safeusb_cmd() -> list[str]:
    """The installed command when present, else the module under this interpreter."""
    if SAFEUSB.exists():
        return [str(SAFEUSB)]
    return [sys.executable, "-m", "safeusb.cli"]


# Reliability figures: tests marked hostile (bad or malicious input), fault (injected
# failures) and race (concurrent actors) are counted and printed at the end of the run.
RELIABILITY = ("hostile", "fault", "race")
_outcomes: dict[str, dict[str, int]] = {k: {} for k in RELIABILITY}
_inputs: dict[str, int] = {k: 0 for k in RELIABILITY}  # cases run, property examples each
_PASSING = re.compile(r"(\d+) passing")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for kind in RELIABILITY:
            if item.get_closest_marker(kind):
                item.user_properties.append(("reliability", kind))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """How many cases a passed test tried: one, or each example hypothesis generated
    (from the statistics its pytest plugin keeps on the item)."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.passed:
        return
    stats = getattr(item, "hypothesis_statistics", None)
    cases = sum(int(n) for n in _PASSING.findall(stats)) if isinstance(stats, str) else 1
    for key, kind in item.user_properties:
        if key == "reliability":
            _inputs[str(kind)] += max(cases, 1)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    for key, kind in report.user_properties:
        if key == "reliability":
            counts = _outcomes[str(kind)]
            counts[report.outcome] = counts.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    built = config.stash.get(_PACKAGES_KEY, None)
    if built is not None and built.seconds:
        terminalreporter.section("package builds")
        terminalreporter.write_line(built.summary())
        if os.environ.get("SAFEUSB_VM_KEEP"):
            terminalreporter.write_line(f"kept {built.workdir}")
    if not any(_outcomes.values()):
        return
    terminalreporter.section("reliability figures")
    for kind in RELIABILITY:
        c = _outcomes[kind]
        total = sum(c.values())
        terminalreporter.write_line(
            f"{kind:<8} {total:>4} tests: {c.get('passed', 0)} passed, "
            f"{c.get('failed', 0)} failed, {c.get('skipped', 0)} skipped; "
            f"{_inputs[kind]} cases passed")
    terminalreporter.write_line(
        "(each passed test checked that nothing was lost and nothing was left changed that "
        "was not undone; a property-based test counts each example it generated as a case)")
