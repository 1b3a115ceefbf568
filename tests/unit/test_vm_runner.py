"""The VM tier's runner: planned boots run in the background, at most N at a time, each
once; a boot asked for without a plan runs at once."""

from __future__ import annotations

import threading
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
