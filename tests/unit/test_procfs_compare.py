"""The /proc scan against the reference scan it replaced (tests/procfs_reference.py), on
every tree recorded on the real kernel: the same namespaces, mounts, uses and unreadable
entries, field by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safeusb.host import procfs
from safeusb.host.roots import Roots
from safeusb.host.selector import Selector, resolve
from safeusb.host.snapshot import read_snapshot
from tests import procfs_reference as reference

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "meta.json").exists())


@pytest.mark.parametrize("name", NAMES)
def test_recorded_tree_scans_alike(name: str) -> None:
    d = FIXTURES / name
    meta = json.loads((d / "meta.json").read_text())
    roots = Roots.from_recording(str(d))
    snap = read_snapshot(roots, resolve(Selector.from_string(meta["stick"]["usb"]), roots))
    nodes = frozenset({(n.kind, n.devnum) for n in snap.nodes}
                      | {("block", b.devnum) for b in snap.blocks.values()})
    fs = frozenset(snap.fs_devices)
    pids = procfs.list_pids(roots)
    assert pids == reference.list_pids(roots)
    new_ns = procfs.read_mount_namespaces(roots, pids)
    old_ns = reference.read_mount_namespaces(roots, pids)
    assert new_ns.namespaces == old_ns.namespaces  # model dataclasses: field by field
    assert new_ns.unreadable == old_ns.unreadable
    new = procfs.scan_processes(roots, pids, nodes, fs)
    old = reference.scan_processes(roots, pids, nodes, fs)
    assert new.uses == old.uses
    assert new.unreadable == old.unreadable
    # The trees hold what the comparison is about: the namespace tree has processes.
    if name == "namespace":
        assert new.uses
