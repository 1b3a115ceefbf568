"""The VM tier's runner: planned boots run in the background, at most N at a time, each
once; a boot marked ``alone`` runs with no other beside it; a boot asked for without a
plan runs at once."""

from __future__ import annotations

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
