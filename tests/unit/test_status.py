"""safeusb status over built trees, with libvirt's test driver for domains."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from safeusb.status import collect
from tests.unit.fakesys import LINUX_NS, ROOT_MOUNT, FakeSystem, mount_line


def test_tree_with_uses(tmp_path: Path) -> None:
    fs = FakeSystem(tmp_path)
    busy = fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    fs.disk(busy, "sda", 8, 0)
    free = fs.usb_device("2-2", 0x46F4, 0x0001, busnum=2, devnum=4, serial="S2")
    fs.disk(free, "sdb", 8, 16)
    fs.process(1, "init", LINUX_NS,
               ROOT_MOUNT + mount_line(300, "8:0", "/srv/photos", "/dev/sda"))
    fs.bdi(8, 0, 4096, 0)
    status = collect(fs.roots, "test:///default")
    text = status.as_text()
    lines = text.splitlines()
    assert lines[0].startswith("usb2 ") and "hub" in lines[0]
    assert any(line.startswith("  2-1 ") and "NOT safe: mounted at /srv/photos, 4.0 MiB dirty"
               in line and "[mass storage; usb-storage]" in line for line in lines), text
    assert any(line.startswith("  2-2 ") and line.endswith(": safe to hand over")
               for line in lines), text
    assert lines[-1] == "libvirt: connected to test:///default"
    doc = status.as_json()
    by_name = {d["sysname"]: d for d in doc["devices"]}
    assert by_name["2-1"]["safe_to_hand_over"] is False
    assert by_name["2-2"]["safe_to_hand_over"] is True
    assert by_name["usb2"]["safe_to_hand_over"] is None
    json.dumps(doc)


def test_without_usb(tmp_path: Path, safeusb_cmd: list[str]) -> None:
    fs = FakeSystem(tmp_path)
    shutil.rmtree(fs.sys / "bus" / "usb")
    status = collect(fs.roots)
    assert "no USB subsystem" in status.as_text() and status.as_json()["devices"] == []
    p = subprocess.run([*safeusb_cmd, "status", "--json"], capture_output=True, text=True,
                       check=False)
    assert p.returncode == 0 and isinstance(json.loads(p.stdout)["devices"], list)


def test_answers_from_safeusbd_show_as_findings_read_here(tmp_path: Path) -> None:
    """Each device's inspect answer (what safeusbd sends: the inspect JSON, through the
    protocol's encoding) gives the status that reading the tree here gives; a device it
    gives no answer for, or an answer that is not an inspect object, is read here."""
    from safeusb.host.model import Target  # noqa: PLC0415
    from safeusb.host.snapshot import read_snapshot  # noqa: PLC0415
    from safeusb.host.sysfs import list_usb_devices  # noqa: PLC0415
    from safeusb.inspect.decide import inspect  # noqa: PLC0415
    from safeusb.inspect.report import as_json  # noqa: PLC0415
    from safeusb.safeusbd import protocol  # noqa: PLC0415

    fs = FakeSystem(tmp_path)
    busy = fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    fs.disk(busy, "sda", 8, 0)
    free = fs.usb_device("2-2", 0x46F4, 0x0001, busnum=2, devnum=4, serial="S2")
    fs.disk(free, "sdb", 8, 16)
    odd = fs.usb_device("2-3", 0x46F4, 0x0001, busnum=2, devnum=5, serial="S3")
    fs.disk(odd, "sdc", 8, 32)
    fs.process(1, "init", LINUX_NS,
               ROOT_MOUNT + mount_line(300, "8:0", "/srv/photos", "/dev/sda"))
    fs.bdi(8, 0, 4096, 0)
    by_addr = {(u.busnum, u.devnum): u for u in list_usb_devices(fs.roots)}
    asked: list[tuple[int, int]] = []

    def ask(bus: int, addr: int) -> dict | None:  # type: ignore[type-arg]
        asked.append((bus, addr))
        if addr == 4:
            return None  # no answer: read here
        if addr == 5:
            return {"free": True, "reasons": [{"kind": "mount"}]}  # not inspect's
        usb = by_addr[(bus, addr)]
        doc = as_json(inspect(read_snapshot(fs.roots, Target(usb.syspath, usb))))
        return protocol.strict_loads(protocol.ok_reply(1, doc)[:-1])["result"]  # type: ignore[no-any-return]

    here = collect(fs.roots)
    there = collect(fs.roots, ask=ask)
    assert sorted(asked) == [(2, 3), (2, 4), (2, 5)]
    assert there.as_text() == here.as_text()
    assert there.as_json() == here.as_json()
    assert "NOT safe: mounted at /srv/photos, 4.0 MiB dirty" in there.as_text()


def test_attach_to_rules_their_domains_and_what_each_holds(tmp_path: Path) -> None:
    """Each rule with attach_to, its domain's state from libvirt (the test driver runs
    "test") and the devices it matches: handed over (a record) or on the host."""
    from safeusb.host.journal import StateDir, new_record  # noqa: PLC0415

    fs = FakeSystem(tmp_path / "root")
    fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    fs.usb_device("2-2", 0x46F4, 0x0001, busnum=2, devnum=4, serial="S2")
    fs.usb_device("2-3", 0x1234, 0x5678, busnum=2, devnum=5, serial="S3")
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rules]]\nname = "sticks"\nvendor_product = "46f4:0001"\n'
                      'attach_to = "test"\n\n'
                      '[[rules]]\nname = "nothing here"\nserial = "NONE"\nattach_to = "g9"\n')
    policy.chmod(0o600)
    state = StateDir(str(tmp_path / "state"))
    state.save(new_record("2-1", "test", [{"kind": "handoff", "text": "x"}], True))
    status = collect(fs.roots, "test:///default", policy_path=str(policy),
                     state_dir=str(tmp_path / "state"))
    text = status.as_text()
    assert "attach_to rules (policy " in text and "10-safeusb-attach.rules: " in text
    assert ("  rule 'sticks' (vendor_product 46f4:0001) -> test (running): holds 2-1 "
            "(handed to test), 2-2 (on the host)") in text.splitlines(), text
    assert ("  rule 'nothing here' (serial NONE) -> g9 (not defined): holds nothing"
            in text.splitlines()), text
    doc = status.as_json()["attach_to"]
    assert [r["domain"] for r in doc["rules"]] == ["test", "g9"]
    assert doc["rules"][0]["devices"] == [{"sysname": "2-1", "state": "handed to test"},
                                          {"sysname": "2-2", "state": "on the host"}]


def test_no_attach_to_rules_no_attach_section(tmp_path: Path) -> None:
    fs = FakeSystem(tmp_path / "root")
    fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    policy = tmp_path / "policy.toml"
    policy.write_text('[defaults]\nmount = "unmount"\n')
    status = collect(fs.roots, "test:///default", policy_path=str(policy))
    assert "attach_to" not in status.as_text() and "attach_to" not in status.as_json()


def test_a_policy_that_cannot_be_read_is_said(tmp_path: Path) -> None:
    fs = FakeSystem(tmp_path / "root")
    fs.usb_device("2-1", 0x46F4, 0x0001, busnum=2, devnum=3)
    policy = tmp_path / "policy.toml"
    policy.write_text("[[rules]\n")
    status = collect(fs.roots, "test:///default", policy_path=str(policy))
    assert f"attach_to rules: not shown: policy {policy}:1" in status.as_text()
    assert status.as_json()["attach_to"]["policy_error"] is True
