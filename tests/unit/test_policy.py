"""Policy files: examples load, rules match, errors name the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safeusb import cli
from safeusb.handover import policy
from safeusb.handover.policy import Policy, PolicyError
from safeusb.host import defaults, journal
from safeusb.host.model import UsbDevice, UsbInterface
from safeusb.safeusbd import protocol

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STICK = UsbDevice("2-2", "/sys/x", 2, 3, 0x0781, 0x5583, serial="A1",
                  interfaces=(UsbInterface("2-2:1.0", 8, "usb-storage"),))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    Policy.from_file(str(path))


def test_first_match_wins_and_domain_matters() -> None:
    p = Policy.from_file(str(EXAMPLES / "policy-sticks.toml"))
    settings, rule = p.settings_for(STICK, "win11")
    assert settings.mount == "unmount" and "backup stick" in rule
    assert settings.flush_timeout == 300
    settings, rule = p.settings_for(STICK, "other")
    assert "front port" in rule  # class 8 on port 2-2
    other = UsbDevice("3-1", "/sys/y", 3, 2, 0x1234, 0x5678)
    settings, rule = p.settings_for(other, "win11")
    assert settings.mount == "refuse" and rule.startswith("defaults of ")


def test_missing_default_file_means_built_in_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = str(tmp_path / "policy.toml")
    monkeypatch.setattr("safeusb.handover.policy.DEFAULT_PATH", default)
    settings, rule = Policy.from_file(default).settings_for(None, None)
    assert settings.mount == "refuse" and rule == "built-in defaults"


@pytest.mark.parametrize(("text", "message", "line"), [
    ('[defaults]\nmount = "yank"\n', "mount must be one of refuse, unmount, force", 2),
    ("[defaults]\nkill = 1\n", "kill must be true or false", 2),
    ('[[rules]]\nname = "nic"\nnetwork = "unmount"\n', "network must be one of refuse, down", 3),
    ('[defaults]\n\nflush_timeout = -3\n', "positive number", 3),
    ('[defaults]\ncolour = "red"\n', "unknown key 'colour'", 2),
    ('[[rules]]\nvendor_product = "46f4"\n', "not of the form vvvv:pppp", 2),
    ('[[rules]]\nusb_class = 300\n', "usb_class must be", 2),
    ('[defaults]\nport = "2-1"\n', "belongs in a [[rules]] table", 2),
    ('[surprise]\n', "unknown key 'surprise'", 1),
    ("rules = 3\n", "array of tables", 1),
    ('[defaults\n', "line 1", 1),
])
@pytest.mark.hostile
def test_errors_name_file_and_line(text: str, message: str, line: int) -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_text(text, "/etc/safeusb/policy.toml")
    assert message in str(exc.value)
    assert exc.value.line == line
    assert str(exc.value).startswith(f"policy /etc/safeusb/policy.toml:{line}:")


@pytest.mark.hostile
def test_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.from_file(str(bad))
    with pytest.raises(PolicyError, match="no such file"):
        Policy.from_file(str(tmp_path / "none.toml"))


@given(st.text(max_size=200))
@pytest.mark.hostile
def test_any_text_loads_or_raises_policy_error(text: str) -> None:
    try:
        Policy.from_text(text)
    except PolicyError:
        pass


def test_cli_defaults_match_the_modules() -> None:
    from safeusb.safeusbd import server as daemon  # noqa: PLC0415

    assert cli.DEFAULT_POLICY == policy.DEFAULT_PATH == defaults.POLICY
    assert cli.DEFAULT_STATE_DIR == journal.DEFAULT_DIR == defaults.STATE_DIR
    assert cli.DEFAULT_SOCKET == protocol.DEFAULT_SOCKET == defaults.SOCKET
    assert (daemon.DEFAULT_POLICY, daemon.DEFAULT_STATE_DIR, daemon.DEFAULT_SOCKET) == (
        defaults.POLICY, defaults.STATE_DIR, defaults.SOCKET)


# --- attach_to ------------------------------------------------------------------------------

def test_attach_to_names_the_domain_and_first_attach_rule_wins() -> None:
    p = Policy.from_text('[[rules]]\nname = "any sandisk"\nvendor_product = "0781:5583"\n'
                         'mount = "unmount"\n\n'
                         '[[rules]]\nname = "backup"\nserial = "A1"\nattach_to = "win10"\n\n'
                         '[[rules]]\nname = "later"\nusb_class = 8\nattach_to = "other"\n')
    assert [r.name for r in p.attach_rules] == ["backup", "later"]
    rule = p.attach_rule_for(STICK)
    assert rule is not None and rule.name == "backup" and rule.attach_to == "win10"
    # How to prepare is decided as always: the first rule that matches.
    settings, source = p.settings_for(STICK, "win10")
    assert settings.mount == "unmount" and "any sandisk" in source
    other = UsbDevice("3-1", "/sys/y", 3, 2, 0x1234, 0x5678)
    assert p.attach_rule_for(other) is None


@pytest.mark.parametrize(("table", "message", "line"), [
    ('attach_to = 3\nserial = "A1"\n', "attach_to must be a libvirt domain name", 2),
    ('attach_to = "a/b"\nserial = "A1"\n', "attach_to must be a libvirt domain name", 2),
    ('attach_to = ""\nserial = "A1"\n', "attach_to must be a libvirt domain name", 2),
    ('attach_to = "g1 "\nserial = "A1"\n', "attach_to must be a libvirt domain name", 2),
    ('attach_to = "g\\"1"\nserial = "A1"\n', "attach_to must be a libvirt domain name", 2),
    ('attach_to = "g1"\n', "attach_to needs a device matcher", 2),
    ('attach_to = "g1"\nmount = "unmount"\n', "attach_to needs a device matcher", 2),
    ('attach_to = "g1"\nserial = "A1"\ndomain = "g2"\n', "leave 'domain' out", 4),
    ('attach_to = "g1"\nserial = "A*"\n', "cannot be matched exactly by udev", 3),
    ('attach_to = "g1"\nserial = "A\\"1"\n', "cannot be matched exactly by udev", 3),
    ('name = "a\\"b"\nattach_to = "g1"\nserial = "A1"\n', "needs a name of printable", 2),
])
@pytest.mark.hostile
def test_attach_to_errors(table: str, message: str, line: int) -> None:
    with pytest.raises(PolicyError) as err:
        Policy.from_text("[[rules]]\n" + table, "p.toml")
    assert message in str(err.value) and err.value.line == line, str(err.value)


def test_attach_to_belongs_in_a_rule() -> None:
    with pytest.raises(PolicyError, match=r"\[defaults\]: 'attach_to' belongs in a "
                                          r"\[\[rules\]\] table"):
        Policy.from_text('[defaults]\nattach_to = "g1"\n', "p.toml")
