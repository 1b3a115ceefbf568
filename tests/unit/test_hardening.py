"""Bypasses an adversary or an accident finds: the hook's size cap, release that depends on
the XML or the policy, root trusting what others can change, and malformed input."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safeusb import cli, trust
from safeusb import hook as hookmod
from safeusb.domain import DomainInfo
from safeusb.errors import SafeUSBError
from safeusb.handover.policy import Policy, PolicyError
from safeusb.handover.transaction import release_domain
from safeusb.host.journal import StateDir, StateError, new_record
from safeusb.host.roots import Roots
from safeusb.host.runner import Runner
from safeusb.install import InstallError, boot_source, install, render
from tests.unit.fakesys import FakeSystem

pytestmark = pytest.mark.hostile

DOMAINS = Path(__file__).parent / "data" / "domains"
NOBODY = 65534
USB = (b"<hostdev mode='subsystem' type='usb' managed='no'><source><vendor id='0x46f4'/>"
       b"<product id='0x0001'/></source></hostdev>")


def _big_domain(metadata_bytes: int) -> bytes:
    """As libvirt writes a domain grown through virDomainSetMetadata: <metadata> first."""
    meta = b"<metadata><a xmlns='urn:a'>" + b"x" * metadata_bytes + b"</a></metadata>"
    return b"<domain type='qemu'><name>big</name>" + meta + b"<devices>" + USB + \
        b"</devices></domain>"


# -- 1. the hook reads the whole document, as the drop-in tested it --------------------


def test_hook_reads_past_4_mib_of_metadata(busy: FakeSystem, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    xml = _big_domain(6 * 1024 * 1024)
    monkeypatch.setattr(sys, "argv", ["-c", "big", "prepare", "begin", "-"])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(xml)))
    monkeypatch.setattr(hookmod.Roots, "host", staticmethod(lambda: busy.roots))
    monkeypatch.setattr(hookmod, "handle", functools.partial(
        hookmod.handle, policy_path=str(tmp_path / "none.toml"),
        state_dir=str(tmp_path / "state")))
    (tmp_path / "none.toml").write_text("[defaults]\n")
    assert hookmod.main() == hookmod.EXIT_REFUSED
    assert "/srv/photos" in capsys.readouterr().err


def test_a_usb_domain_too_large_to_read_is_refused(busy: FakeSystem, tmp_path: Path) -> None:
    xml = _big_domain(hookmod.MAX_DOMAIN_XML_BYTES)
    assert hookmod.handle(["big", "prepare", "begin", "-"], xml, busy.roots,
                        str(tmp_path / "p.toml"), str(tmp_path / "s")) == hookmod.EXIT_REFUSED
    plain = xml.replace(b"type='usb'", b"type='pci'")
    assert hookmod.handle(["big", "prepare", "begin", "-"], plain, busy.roots,
                        str(tmp_path / "p.toml"), str(tmp_path / "s")) == 0


def _stub_python(tmp_path: Path) -> Path:
    """An interpreter stand-in that keeps what the drop-in gives it and answers 0."""
    stub = tmp_path / "python"
    stub.write_text(f"#!/bin/sh\ncat > {tmp_path}/got\nexit 0\n")
    stub.chmod(0o755)
    return stub


_PIECES = st.sampled_from([
    b"<hostdev mode='subsystem' type='usb'", b'<hostdev mode="subsystem" type="usb"',
    b"<hostdev mode='subsystem' type='pci'", b"<hostdev type='usb' mode='subsystem'",
    b"<hostdev mode='subsystem'", b" type='usb'", b"\0", b"\n", b"\n\n", b"'", b'"', b"*",
    b"?", b"[", b"\\", b"$(x)", b"\xff\xfe", b"<domain>", b"</domain>", b"x" * 70000,
])


@given(pieces=st.lists(_PIECES, max_size=8), op=st.sampled_from(["prepare", "release"]),
       shell=st.sampled_from(["/bin/sh", "/bin/bash"]))
def test_dropin_and_python_agree_on_usb(tmp_path_factory: pytest.TempPathFactory,
                                        pieces: list[bytes], op: str, shell: str) -> None:
    """The drop-in runs Python exactly when Python's own test sees a USB host device in
    what it is given, and gives it the whole document (a shell keeps no NUL byte)."""
    tmp = tmp_path_factory.mktemp("dropin")
    hook_path = tmp / "hook"
    hook_path.write_text(render(str(_stub_python(tmp)), boot="pass").replace(
        "/run/safeusb", str(tmp / "records")))
    xml = b"".join(pieces)
    p = subprocess.run([shell, str(hook_path), "d", op, "begin" if op == "prepare" else "end",
                        "-"], input=xml, capture_output=True, timeout=60, check=False)
    assert p.returncode == 0
    seen = xml.replace(b"\0", b"")
    ran = (tmp / "got").exists()
    assert ran == hookmod.looks_usb(seen)
    if ran:
        got = (tmp / "got").read_bytes()
        assert got == seen.rstrip(b"\n") + b"\n" and hookmod.looks_usb(got)


def test_dropin_runs_release_when_records_exist(tmp_path: Path) -> None:
    records = tmp_path / "records"
    hook_path = tmp_path / "hook"
    hook_path.write_text(render(str(_stub_python(tmp_path)), boot="pass").replace(
        "/run/safeusb", str(records)))
    plain = (DOMAINS / "none.xml").read_bytes()

    def call(op: str, sub: str) -> None:
        subprocess.run(["/bin/sh", str(hook_path), "g1", op, sub, "-"], input=plain,
                       check=True, timeout=60)

    call("release", "end")
    assert not (tmp_path / "got").exists()
    records.mkdir()
    (records / "2-1.json").write_text("{}")
    call("prepare", "begin")
    assert not (tmp_path / "got").exists()  # a domain without USB never starts Python
    call("release", "end")
    assert (tmp_path / "got").exists()  # what it took is in the records, not the XML


# -- 4. giving back depends on the records alone ---------------------------------------


def _taken(state: StateDir, key: str, domain: str, restore: bool = True) -> Path:
    with state.lock(key):
        state.save(new_record(key, domain, [], restore))
    return Path(state.path) / f"{key}.json"


def test_release_end_without_the_device_in_the_xml_and_a_broken_policy(
        busy: FakeSystem, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = StateDir(str(tmp_path / "state"))
    mine = _taken(state, "2-1", "g1")
    other = Path(state.path) / "3-1.json"
    other.write_text("[1, 2]")
    other.chmod(0o600)
    policy = tmp_path / "policy.toml"
    policy.write_text("[defaults]\nmount = 'nonsense'\n")
    xml = (DOMAINS / "none.xml").read_bytes()  # detached live: no longer listed
    assert hookmod.handle(["g1", "release", "end", "-"], xml, busy.roots, str(policy),
                        state.path) == 0
    assert not mine.exists()
    err = capsys.readouterr().err
    assert "3-1.json is garbled" in err and "giving back by the records alone" in err


def test_release_domain_reports_every_record_it_cannot_act_on(tmp_path: Path) -> None:
    fs = FakeSystem(tmp_path / "root")
    state = StateDir(str(tmp_path / "state"))
    good = _taken(state, "2-1", "g1")
    bad_step = _taken(state, "2-2", "g1")
    doc = json.loads(bad_step.read_text())
    doc["steps"] = [{"kind": "unmount", "nonsense": 1}]
    bad_step.write_text(json.dumps(doc))
    (Path(state.path) / "2-3.json").symlink_to("/etc/passwd")
    out = release_domain(fs.roots, "g1", None, Runner(), state)
    assert not good.exists() and not out.ok
    text = "\n".join(out.not_undone)
    assert "2-2: a recorded unmount step is malformed" in text
    assert "2-3.json is a symlink" in text


def test_cli_release_under_an_invalid_policy(busy: FakeSystem, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    state = StateDir(str(tmp_path / "state"))
    mine = _taken(state, "2-1", "g1", restore=False)
    policy = tmp_path / "policy.toml"
    policy.write_text("[defaults\n")
    rc = cli.main(["release", "2-1", "--policy", str(policy), "--state-dir", state.path],
                  busy.roots)
    assert rc == 0 and not mine.exists()
    assert "giving back by the records alone" in capsys.readouterr().err


# -- 5. root trusts only what root alone can change -------------------------------------


def _tree(tmp_path: Path) -> Path:
    d = tmp_path / "t" / "a" / "b"
    d.mkdir(parents=True)
    (d / "f").write_text("x")
    return d


def test_trust_walks_every_component(tmp_path: Path) -> None:
    d = _tree(tmp_path)
    assert trust.check_path(str(d / "f")) == str(d / "f")
    os.chown(d.parent, NOBODY, -1)
    with pytest.raises(trust.Untrusted, match=f"{d.parent} is owned by .*65534"):
        trust.check_path(str(d / "f"))
    os.chown(d.parent, 0, -1)
    d.parent.chmod(0o775)
    with pytest.raises(trust.Untrusted, match="writable by its group"):
        trust.check_path(str(d / "f"))
    d.parent.chmod(0o755)
    (d / "f").chmod(0o646)
    with pytest.raises(trust.Untrusted, match="writable by others"):
        trust.check_path(str(d), recursive=True)
    (d / "f").chmod(0o644)
    link = tmp_path / "t" / "link"
    evil = tmp_path / "evil"
    evil.mkdir()
    os.chown(evil, NOBODY, -1)
    link.symlink_to(evil)
    with pytest.raises(trust.Untrusted, match="evil is owned"):
        trust.check_path(str(link))


def test_sticky_world_writable_directory_passes_only_root_entries(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "mine").write_text("x")
    trust.check_path(str(sticky / "mine"))
    (sticky / "theirs").write_text("x")
    os.chown(sticky / "theirs", NOBODY, -1)
    with pytest.raises(trust.Untrusted):
        trust.check_path(str(sticky / "theirs"))
    sticky.chmod(0o777)
    with pytest.raises(trust.Untrusted, match="writable by its group and others"):
        trust.check_path(str(sticky / "mine"))


def test_policy_others_can_change_is_not_obeyed(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[defaults]\nopen = "force"\nkill = true\n')
    assert Policy.from_file(str(policy)).defaults.kill
    for owner, mode in ((NOBODY, 0o644), (0, 0o666), (0, 0o664)):
        os.chown(policy, owner, -1)
        policy.chmod(mode)
        with pytest.raises(PolicyError, match="not obeyed: others can change it"):
            Policy.from_file(str(policy))


def _package_copy(tmp_path: Path, owner: int) -> Path:
    code = tmp_path / "code"
    shutil.copytree(Path(hookmod.__file__).parent, code / "safeusb")
    for top, dirs, files in os.walk(code):
        for name in [*dirs, *files, "."]:
            os.chown(os.path.join(top, name), owner, -1)
    return code


def test_dropin_refuses_code_others_can_change(tmp_path: Path) -> None:
    code = _package_copy(tmp_path, NOBODY)
    boot = boot_source(str(code / "safeusb"), [str(code), "/usr/lib/python3/dist-packages"])
    hook_path = tmp_path / "hook"
    hook_path.write_text(render(sys.executable, boot))
    hook_path.chmod(0o755)
    p = subprocess.run([str(hook_path), "g1", "prepare", "begin", "-"],
                       input=(DOMAINS / "by-id.xml").read_bytes(), capture_output=True,
                       timeout=60, check=False)
    assert p.returncode == 1
    assert b"refusing to run code that others can change" in p.stderr
    assert b"is owned by" in p.stderr and b"65534" in p.stderr


def test_install_hook_refuses_untrusted_code_and_planted_names(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    hooks = tmp_path / "root" / "etc/libvirt/hooks/qemu.d"
    hooks.mkdir(parents=True)
    for pid in range(os.getpid() - 5, os.getpid() + 50):  # the old predictable names
        (hooks / f"safeusb.{pid}.tmp").symlink_to(victim)
    installed = install(str(tmp_path / "root"), sys.executable, check=True)
    assert installed.changed and victim.read_text() == "keep"
    assert not Path(installed.path).is_symlink()
    Path(installed.path).unlink()
    Path(installed.path).symlink_to(victim)
    with pytest.raises(InstallError):
        install(str(tmp_path / "root"), sys.executable)
    assert victim.read_text() == "keep"


# -- 6. malformed input: one line, the right exit code ----------------------------------


@pytest.mark.parametrize("doc", [
    "[]", "null", '"x"', "{}", '{"key": 1, "domain": null, "created": 1, "steps": []}',
    '{"key": "2-1", "domain": 5, "created": 1, "steps": []}',
    '{"key": "2-1", "domain": null, "created": "soon", "steps": []}',
    '{"key": "2-1", "domain": null, "created": 1, "steps": "abc"}',
    '{"key": "2-1", "domain": null, "created": 1, "steps": [1]}',
    '{"key": "2-1", "domain": null, "created": 1, "steps": [], "restore": "yes"}',
    '{"key": "9-9", "domain": null, "created": 1, "steps": []}',
    "[" * 100000 + "]" * 100000,
])
def test_state_records_of_the_wrong_shape(busy: FakeSystem, tmp_path: Path, doc: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    record = state / "2-1.json"
    record.write_text(doc)
    record.chmod(0o600)
    with pytest.raises(StateError, match="not trusted"):
        StateDir(str(state)).load("2-1")
    rc = cli.main(["release", "2-1", "--state-dir", str(state)], busy.roots)
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "not trusted" in err, err


@given(doc=st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
                        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                        max_leaves=20),
       fields=st.dictionaries(st.sampled_from(["key", "domain", "created", "steps",
                                               "restore"]),
                              st.none() | st.booleans() | st.integers() | st.text()
                              | st.lists(st.dictionaries(st.text(), st.text()))))
def test_any_json_record_loads_or_is_refused(tmp_path_factory: pytest.TempPathFactory,
                                             doc: Any, fields: dict[str, Any]) -> None:
    state = tmp_path_factory.mktemp("state")
    state.chmod(0o700)
    for i, value in enumerate((doc, fields)):
        path = state / f"k{i}.json"
        path.write_text(json.dumps(value))
        path.chmod(0o600)
        try:
            StateDir(str(state)).load(f"k{i}")
        except StateError:
            pass
    fs = FakeSystem(tmp_path_factory.mktemp("root"))
    try:
        release_domain(fs.roots, "g1", None, Runner(), StateDir(str(state)))
    except SafeUSBError:
        pass


def test_a_lock_file_that_is_a_symlink(busy: FakeSystem, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "2-1.lock").symlink_to(tmp_path / "elsewhere")
    for command in ("prepare", "release"):
        rc = cli.main([command, "2-1", "--state-dir", str(state)], busy.roots)
        err = capsys.readouterr().err
        assert rc == 1 and "is a symlink" in err and err.count("\n") == 1, err
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e309", "0", "-1", "86401"])
def test_timeouts_must_be_finite_and_bounded(tmp_path: Path, value: str) -> None:
    with pytest.raises(PolicyError, match="positive number of seconds"):
        Policy.from_text(f"[defaults]\nflush_timeout = {value}\n")
    info = DomainInfo("g1", (), {"flush_timeout": value})
    with pytest.raises(PolicyError, match="positive number of seconds"):
        info.settings(Policy().defaults)
    with pytest.raises(SafeUSBError, match="positive number of seconds"):
        cli.build_parser().parse_args(["prepare", "2-1", f"--timeout={value}"])


def test_deeply_nested_policy(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="nested too deeply"):
        Policy.from_text("x = " + "[" * 100000 + "]" * 100000 + "\n")


def test_a_missing_usb_device_is_logged(busy: FakeSystem, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    xml = (DOMAINS / "by-id.xml").read_bytes().replace(b"0x46f4", b"0x1111")
    policy = tmp_path / "p.toml"
    policy.write_text("[defaults]\n")
    assert hookmod.handle(["g1", "prepare", "begin", "-"], xml, busy.roots, str(policy),
                        str(tmp_path / "s")) == 0
    assert "1111:0001 is not on the host" in caplog.text


def test_roots_is_the_only_host_access_here() -> None:
    """The recorded tree stands in for the host in every test of this module."""
    assert Roots.from_recording("/x").live is False
