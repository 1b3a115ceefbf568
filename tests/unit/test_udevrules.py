"""udev rules generated from the policy's attach_to rules (safeusb.udevrules): golden
output, installation and its state."""

from __future__ import annotations

from pathlib import Path

import pytest

from safeusb import cli, udevrules
from safeusb.handover.policy import Policy

DATA = Path(__file__).resolve().parent / "data" / "udev"
TWO = """\
[[rules]]
name = "test stick"
vendor_product = "46f4:0001"
attach_to = "g1"

[[rules]]
name = "no attach"
vendor_product = "1234:5678"
mount = "unmount"

[[rules]]
name = "backup"
serial = ["SU01", "X 2"]
port = "2-3"
usb_class = 8
attach_to = "win 10"
"""


def test_golden_two_rules() -> None:
    """Each matcher sets a temporary variable, on the block device's parent chain; the
    first rule that matches names the domain; every marked disk gets what udisks and
    systemd honour."""
    text = udevrules.render(Policy.from_text(TWO, "policy.toml"))
    assert text == (DATA / "two-rules.rules").read_text()


def test_marks_are_what_udisks_and_systemd_honour() -> None:
    text = udevrules.render(Policy.from_text(TWO, "policy.toml"))
    mark = [ln for ln in text.splitlines() if "UDISKS_IGNORE" in ln and not ln.startswith("#")]
    assert mark == ['ENV{SAFEUSB_ATTACH_TO}=="?*", ENV{UDISKS_IGNORE}="1", '
                    'ENV{UDISKS_AUTO}="0", ENV{SYSTEMD_READY}="0"']
    assert 'SUBSYSTEM!="block", GOTO="safeusb_attach_end"' in text
    assert "1234" not in text  # a rule without attach_to marks nothing


def test_no_attach_rules_no_udev_rules() -> None:
    text = udevrules.render(Policy.from_text('[defaults]\nmount = "unmount"\n', "p.toml"))
    assert [ln for ln in text.splitlines() if not ln.startswith("#")] == []


def test_the_rules_file_sorts_before_udisks_and_systemd() -> None:
    assert udevrules.RULES_NAME < "80-udisks2.rules" < "99-systemd.rules"
    assert udevrules.RULES_NAME < "60-persistent-storage.rules"


def test_install_writes_once_and_states_follow(tmp_path: Path) -> None:
    policy = Policy.from_text(TWO, "policy.toml")
    assert udevrules.installed_state(policy, str(tmp_path)) == "missing"
    first = udevrules.install(policy, str(tmp_path), reload=False)
    path = tmp_path / "etc/udev/rules.d/10-safeusb-attach.rules"
    assert first.changed and first.path == str(path)
    assert path.read_text() == udevrules.render(policy)
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert udevrules.installed_state(policy, str(tmp_path)) == "up to date"
    again = udevrules.install(policy, str(tmp_path), reload=False)
    assert not again.changed and "already up to date" in again.describe()
    other = Policy.from_text(TWO.replace('"g1"', '"g2"'), "policy.toml")
    assert udevrules.installed_state(other, str(tmp_path)) == "out of date"
    assert udevrules.installed_state(Policy(), str(tmp_path / "x")) == "not needed"


def test_install_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    rules = tmp_path / "etc/udev/rules.d"
    rules.mkdir(parents=True)
    (rules / udevrules.RULES_NAME).symlink_to(victim)
    udevrules.install(Policy.from_text(TWO, "p.toml"), str(tmp_path), reload=False)
    assert victim.read_text() == "keep\n"
    assert not (rules / udevrules.RULES_NAME).is_symlink()


def test_cli_prints_and_installs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(TWO)
    policy.chmod(0o600)
    assert cli.main(["install-udev-rules", "--policy", str(policy), "--print"]) == 0
    assert 'ENV{SAFEUSB_ATTACH_TO}="g1"' in capsys.readouterr().out
    assert cli.main(["install-udev-rules", "--policy", str(policy), "--root",
                     str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote ") and "reloaded" not in out
