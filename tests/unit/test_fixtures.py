"""Trees recorded on the real kernel (tools/record-fixtures) drive inspect and plans.

Golden plans live in tests/unit/data/plans/NAME.POLICY.txt; after a deliberate change,
regenerate them with SAFEUSB_REGOLD=1 and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from safeusb.handover.plan import build_plan, describe_plan
from safeusb.handover.policy import Policy
from safeusb.host.roots import Roots
from safeusb.host.selector import Selector, resolve
from safeusb.host.snapshot import read_snapshot
from safeusb.inspect.decide import Findings, inspect

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PLANS = Path(__file__).resolve().parent / "data" / "plans"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "meta.json").exists())
UNMOUNT = Policy.from_text('[defaults]\nmount="unmount"\nswap="unmount"\nholder="unmount"\n'
                           'open="force"\n', "unmount.toml")


def findings(name: str, selector: str | None = None) -> Findings:
    d = FIXTURES / name
    meta = json.loads((d / "meta.json").read_text())
    roots = Roots.from_recording(str(d))
    target = resolve(Selector.from_string(selector or meta["stick"]["usb"]), roots)
    return inspect(read_snapshot(roots, target))


def kinds(f: Findings) -> list[str]:
    return sorted(r.kind for r in f.reasons)


EXPECTED = {
    "idle": [],
    "dirty": ["dirty", "mount"],
    "luks": ["holder", "mount"],
    "lvm": ["holder"],
    "namespace": ["mount", "open", "open"],
    "swap": ["swap"],
}


@pytest.mark.parametrize("name", NAMES)
def test_inspect_over_recorded_tree(name: str) -> None:
    meta = json.loads((FIXTURES / name / "meta.json").read_text())
    by_port = findings(name)
    by_node = findings(name, meta["stick"]["dev"])
    assert kinds(by_port) == kinds(by_node) == EXPECTED[name], [r.text for r in by_port.reasons]
    assert by_port.free == (name == "idle")


def test_recorded_details() -> None:
    dirty = findings("dirty")
    (d,) = [r for r in dirty.reasons if r.kind == "dirty"]
    assert d.details.dirty_bytes >= 4 * 1024 * 1024 - 64 * 1024
    ns = findings("namespace")
    (m,) = [r for r in ns.reasons if r.kind == "mount"]
    assert m.details.mountpoint == "/tmp/nsmnt" and m.details.mnt_ns != 4026531841
    assert any(r.kind == "open" and r.details.uses == () for r in ns.reasons)  # raw node
    luks = findings("luks")
    (h,) = [r for r in luks.reasons if r.kind == "holder"]
    assert h.details.holder_kind == "dm-crypt" and h.details.dm_name == "stickcrypt"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("policy", ["unmount", "refuse"])
def test_golden_plans(name: str, policy: str) -> None:
    f = findings(name)
    p = UNMOUNT if policy == "unmount" else Policy()
    settings, rule = p.settings_for(f.snapshot.target.usb, None)
    got = "\n".join(describe_plan(build_plan(f, settings, rule))) + "\n"
    golden = PLANS / f"{name}.{policy}.txt"
    if os.environ.get("SAFEUSB_REGOLD"):
        golden.write_text(got)
    assert got == golden.read_text()
