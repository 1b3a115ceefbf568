"""The VM tier's runner: planned boots run in the background, at most N at a time, each
once; a boot marked ``alone`` runs with no other beside it; a boot asked for without a
plan runs at once."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from safeusb.lab import harness
from safeusb.lab.harness import Boot, BootResult, Runner


def test_planned_boots_run_two_at_a_time_each_once(monkeypatch: pytest.MonkeyPatch) -> None:
    running: set[str] = set()
    most = 0
    calls: list[str] = []
    lock = threading.Lock()
    together = threading.Barrier(2, timeout=30)  # the first two must run at the same time

    def fake_run(boot: Boot, scenario_dir: Path, workroot: Path | None = None) -> BootResult:
        nonlocal most
        assert scenario_dir == Path("/scenarios")
        with lock:
            calls.append(boot.name)
            running.add(boot.name)
            most = max(most, len(running))
        if boot.name in ("b0", "b1"):
            together.wait()
        with lock:
            running.discard(boot.name)
        return BootResult(boot=boot, workdir=Path("/nonexistent"), rc=0, wall_seconds=0.0,
                          error=None, timings={}, payload_sums={})

    monkeypatch.setattr(harness, "run_boot", fake_run)
    boots = [Boot(name=f"b{i}", scenarios=()) for i in range(5)]
    runner = Runner(keep=True, scenario_dir=Path("/scenarios"), parallel=2)
    runner.plan(boots)
    runner.plan(boots[:2])  # planned twice: still once
    assert [runner.run(b).boot.name for b in reversed(boots)] == [f"b{i}" for i in range(4, -1, -1)]
    assert runner.run(Boot(name="extra", scenarios=())).boot.name == "extra"
    runner.cleanup()
    assert sorted(calls) == sorted([f"b{i}" for i in range(5)] + ["extra"])
    assert calls[:2] == ["b0", "b1"] and most == 2


def test_alone_boots_never_share_the_machine(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    lock = threading.Lock()
    running: set[str] = set()
    overlaps: list[frozenset[str]] = []

    def fake_run_boot(boot: Boot, scenario_dir: Path) -> object:
        with lock:
            running.add(boot.name)
            overlaps.append(frozenset(running))
        time.sleep(0.05)
        with lock:
            running.discard(boot.name)
        return boot.name

    monkeypatch.setattr(harness, "run_boot", fake_run_boot)
    boots = [Boot(name=f"b{i}", scenarios=(), alone=i in (2, 5)) for i in range(8)]
    runner = Runner(keep=True, scenario_dir=tmp_path, parallel=2)
    runner.plan(boots)
    assert [runner.run(b) for b in boots] == [b.name for b in boots]
    runner.cleanup()
    together = [s for s in overlaps if len(s) > 1]
    assert together, "no two boots ever ran at once"
    assert not [s for s in together if s & {"b2", "b5"}], overlaps


def test_a_guest_that_never_started_the_driver_is_booted_again(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only a kernel that stopped before the driver's first mark is booted again, once;
    a boot that reached the driver keeps its result, failed or not."""
    outcomes: list[tuple[str | None, dict[str, float]]] = []
    calls: list[str] = []
    made = iter(range(100))

    def fake_once(boot: Boot, scenario_dir: Path, workroot: Path | None,
                  ready_within: float) -> BootResult:
        error, timings = outcomes.pop(0)
        calls.append(boot.name)
        work = tmp_path / f"w{next(made)}"
        work.mkdir()
        (work / "console.log").write_text("[    1.27] Switched to clocksource hpet\n")
        return BootResult(boot=boot, workdir=work, rc=None, wall_seconds=1.0, error=error,
                          timings=timings, payload_sums={})

    monkeypatch.setattr(harness, "_boot_once", fake_once)
    monkeypatch.delenv("SAFEUSB_VM_KEEP", raising=False)
    boot = Boot(name="b", scenarios=())
    stuck = "the guest did not start the driver within 420 s"
    outcomes[:] = [(stuck, {}), (None, {"driver_start": 20.0})]
    res = harness.run_boot(boot, Path("/scenarios"))
    assert calls == ["b", "b"] and res.error is None
    assert res.retried is not None and "clocksource hpet" in res.retried
    assert not (tmp_path / "w0").exists() and (tmp_path / "w1").exists()
    # Failed after the driver started: the failure stands, nothing is booted again.
    calls.clear()
    outcomes[:] = [("the VM did not finish within 900 s", {"driver_start": 20.0})]
    res = harness.run_boot(boot, Path("/scenarios"))
    assert calls == ["b"] and res.error and res.retried is None
    # Stuck twice: the second result, with its error, is the boot's.
    calls.clear()
    outcomes[:] = [(stuck, {}), (stuck, {})]
    res = harness.run_boot(boot, Path("/scenarios"))
    assert calls == ["b", "b"] and res.error == stuck and res.retried


def test_a_boot_gets_the_newest_kernel_of_its_series_with_modules(tmp_path: Path) -> None:
    """Debian 12's 6.1 by default, never a 6.12 installed beside it (and the other way
    round); within a series the newest image whose modules are installed."""
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for i, ver in enumerate(("6.1.0-47-amd64", "6.1.0-56-amd64", "6.1.0-60-amd64",
                             "6.12.117+deb12-amd64")):
        image = boot / f"vmlinuz-{ver}"
        image.write_bytes(b"")
        os.utime(image, (1000 + i, 1000 + i))
        if ver != "6.1.0-60-amd64":  # an image without its modules is not bootable here
            (modules / ver / "kernel").mkdir(parents=True)
    assert harness.find_kernel(boot=str(boot), modules=str(modules)) == \
        boot / "vmlinuz-6.1.0-56-amd64"
    assert harness.find_kernel("6.12", str(boot), str(modules)) == \
        boot / "vmlinuz-6.12.117+deb12-amd64"
    assert harness.find_kernel("6.6", str(boot), str(modules)) is None
