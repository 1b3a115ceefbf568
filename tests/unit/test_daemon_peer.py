"""Who may ask safeusbd what: cgroup lines as libvirt and systemd write them, the
confirmation against libvirt's pid file, and the rules, all as pure functions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safeusb.safeusbd.peer import (
    Caller,
    LibvirtResolver,
    MachineScope,
    Peer,
    classify,
    machine_scope,
    refusal,
)

SCOPE = r"/machine.slice/machine-qemu\x2d3\x2dwin\x2d10.scope"

# /proc/PID/cgroup of QEMU processes and others, as the kernel shows them.
V2_EMULATOR = rf"0::{SCOPE}/libvirt/emulator" + "\n"
V2_VCPU = rf"0::{SCOPE}/libvirt/vcpu0" + "\n"
V2_SCOPE_ONLY = rf"0::{SCOPE}" + "\n"
V1_LEGACY = (
    "12:pids:/machine.slice/machine-qemu\\x2d3\\x2dwin\\x2d10.scope/emulator\n"
    "11:devices:/machine.slice/machine-qemu\\x2d3\\x2dwin\\x2d10.scope/emulator\n"
    "4:cpu,cpuacct:/machine.slice/machine-qemu\\x2d3\\x2dwin\\x2d10.scope/emulator\n"
    "1:name=systemd:/machine.slice/machine-qemu\\x2d3\\x2dwin\\x2d10.scope\n"
)
HYBRID = V1_LEGACY + "0::" + SCOPE + "\n"
CGROUPFS = "0::/machine/qemu-4-vm1.libvirt-qemu/emulator\n"
USER = "0::/user.slice/user-1000.slice/session-2.scope\n"
LIBVIRTD = "0::/system.slice/libvirtd.service\n"
# A user can name a scope of their own manager like libvirt's: the path gives it away.
USER_FAKE = ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/"
             "machine-qemu\\x2d3\\x2dwin\\x2d10.scope\n")
# Controllers alone say nothing about the unit; systemd's hierarchy says "user".
V1_MIXED = ("5:cpuset:/machine.slice/machine-qemu\\x2d3\\x2dwin\\x2d10.scope/emulator\n"
            "1:name=systemd:/user.slice/user-1000.slice/session-2.scope\n")
HYBRID_DISAGREE = ("1:name=systemd:/machine.slice/machine-qemu\\x2d3\\x2dwin\\x2d10.scope\n"
                   "0::/machine.slice/machine-qemu\\x2d5\\x2dother.scope/libvirt/emulator\n")


@pytest.mark.parametrize("text", [V2_EMULATOR, V2_VCPU, V2_SCOPE_ONLY, V1_LEGACY, HYBRID])
def test_libvirt_scopes_are_recognised(text: str) -> None:
    assert machine_scope(text) == MachineScope(3, "win-10", SCOPE)


def test_libvirt_cgroupfs_layout_without_systemd() -> None:
    assert machine_scope(CGROUPFS) == MachineScope(4, "vm1", "/machine/qemu-4-vm1.libvirt-qemu")


def test_escaped_bytes_are_unescaped_in_the_name_hint() -> None:
    text = "0::/machine.slice/machine-qemu\\x2d12\\x2dcaf\\xc3\\xa9\\x2e1.scope/libvirt\n"
    scope = machine_scope(text)
    assert scope is not None and (scope.domain_id, scope.name) == (12, "café.1")


@pytest.mark.hostile
@pytest.mark.parametrize("text", [USER, LIBVIRTD, V1_MIXED, HYBRID_DISAGREE, "", "garbage",
                                  "0::/machine.slice/machine-qemu\\x2dx\\x2dg.scope\n",
                                  "0::/machine.slice/machine-lxc\\x2d3\\x2dg.scope\n",
                                  "0::/machine.slice/machine-qemu\\x2d3\\x2d.scope\n"])
def test_other_processes_are_in_no_domain(text: str) -> None:
    assert machine_scope(text) is None


def test_a_scope_is_found_wherever_it_lies_so_libvirt_can_reject_the_path() -> None:
    scope = machine_scope(USER_FAKE)
    assert scope is not None and scope.path.startswith("/user.slice/")


def _confirming(name: str | None, why: str = "confirmed"):  # type: ignore[no-untyped-def]
    seen: list[MachineScope] = []

    def resolve(scope: MachineScope) -> tuple[str | None, str]:
        seen.append(scope)
        return name, why

    return resolve, seen


def test_root_is_root_whatever_its_cgroup() -> None:
    resolve, seen = _confirming("g1")
    c = classify(Peer(10, 0, 0), V2_EMULATOR, resolve)
    assert c.role == "root" and seen == []


def test_a_qemu_process_is_its_domain_only_once_libvirt_confirms_it() -> None:
    resolve, seen = _confirming("win-10")
    c = classify(Peer(10, 64055, 64055), V2_EMULATOR, resolve)
    assert (c.role, c.domain) == ("domain", "win-10") and seen[0].domain_id == 3
    nobody, _ = _confirming(None, "libvirt has no running domain with ID 3")
    c = classify(Peer(10, 64055, 64055), V2_EMULATOR, nobody)
    assert c.role == "other" and "no running domain with ID 3" in c.why
    assert classify(Peer(10, 1000, 1000), USER, resolve).role == "other"
    assert classify(Peer(10, 1000, 1000), None, resolve).role == "other"


G1 = Caller(Peer(10, 64055, 64055), "domain", "g1")
OTHER = Caller(Peer(11, 65534, 65534), "other", why="not in a libvirt QEMU domain's cgroup")
ROOT = Caller(Peer(12, 0, 0), "root")


def test_rules() -> None:
    for op in ("ping", "inspect", "prepare", "release"):
        assert refusal(ROOT, op, None, False) is None
        assert refusal(ROOT, op, "any", False) is None
    assert refusal(G1, "prepare", "g1", True) is None
    assert refusal(G1, "release", "g1", True) is None
    assert "only for that domain, not for 'g2'" in str(refusal(G1, "prepare", "g2", True))
    assert "must name its domain" in str(refusal(G1, "release", None, True))
    assert refusal(G1, "inspect", None, False) is None
    assert refusal(OTHER, "ping", None, False) is None
    assert refusal(OTHER, "inspect", None, True) is None
    assert refusal(OTHER, "inspect", None, False) is not None
    for op in ("prepare", "release"):
        why = refusal(OTHER, op, "g1", True)
        assert why is not None and "only root or a QEMU process" in why
        assert "not in a libvirt QEMU domain's cgroup" in why


@pytest.fixture
def libvirt_side(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fake /proc and /run/libvirt/qemu: domain win-10's QEMU is pid 4242 in SCOPE."""
    proc, piddir = tmp_path / "proc", tmp_path / "qemu"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text(V2_EMULATOR)
    piddir.mkdir()
    (piddir / "win-10.pid").write_text("4242\n")
    resolver = LibvirtResolver(proc=str(proc), pid_dir=str(piddir))
    resolver.pid_owner = os.geteuid()  # the files here are the test's own
    return resolver, proc, piddir


def test_libvirt_confirms_a_scope_by_its_qemu_pid(libvirt_side) -> None:  # type: ignore[no-untyped-def]
    resolver, _, _ = libvirt_side
    name, why = resolver.confirm(MachineScope(3, "win-10", SCOPE), "win-10")
    assert name == "win-10" and "QEMU pid 4242" in why


@pytest.mark.hostile
def test_a_look_alike_scope_is_not_confirmed(libvirt_side) -> None:  # type: ignore[no-untyped-def]
    resolver, _, _ = libvirt_side
    fake = machine_scope(USER_FAKE)
    assert fake is not None
    name, why = resolver.confirm(fake, "win-10")
    assert name is None and "is not in /user.slice/" in why


@pytest.mark.hostile
def test_missing_or_planted_pid_files_confirm_nothing(libvirt_side) -> None:  # type: ignore[no-untyped-def]
    resolver, proc, piddir = libvirt_side
    scope = MachineScope(3, "win-10", SCOPE)
    for name in ("../win-10", "", "..", "other"):
        assert resolver.confirm(scope, name)[0] is None
    pid_file = piddir / "win-10.pid"
    pid_file.chmod(0o666)  # others could have written it
    assert resolver.confirm(scope, "win-10")[0] is None
    pid_file.chmod(0o644)
    pid_file.write_text("4242x\n")
    assert resolver.confirm(scope, "win-10")[0] is None
    pid_file.unlink()
    pid_file.symlink_to(proc / "4242" / "cgroup")
    assert resolver.confirm(scope, "win-10")[0] is None
    pid_file.unlink()
    pid_file.write_text("4243\n")  # a QEMU that is gone
    assert "is gone" in resolver.confirm(scope, "win-10")[1]


def test_the_resolver_keeps_one_libvirt_connection_and_opens_another_when_it_breaks(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """libvirt's test driver: domain ID 1 is "test"; the same connection serves every
    caller until it is closed under the resolver, which then opens a new one."""
    pytest.importorskip("libvirt", reason="libvirt-python is a dependency of safeusbd")
    (tmp_path / "proc" / "77").mkdir(parents=True)
    (tmp_path / "proc" / "77" / "cgroup").write_text(
        "0::/machine.slice/machine-qemu\\x2d1\\x2dtest.scope/libvirt/emulator\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "test.pid").write_text("77\n")
    resolver = LibvirtResolver(uri="test:///default", proc=str(tmp_path / "proc"),
                               pid_dir=str(tmp_path / "run"))
    resolver.pid_owner = os.geteuid()
    scope = MachineScope(1, "test", r"/machine.slice/machine-qemu\x2d1\x2dtest.scope")
    assert resolver(scope)[0] == "test"
    first = resolver._conn
    assert resolver(scope)[0] == "test" and resolver._conn is first
    first.close()
    assert resolver(scope)[0] == "test" and resolver._conn is not first
    assert resolver(MachineScope(9, "x", "/machine/qemu-9-x.libvirt-qemu"))[0] is None
