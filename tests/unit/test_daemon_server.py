"""safeusbd's server in this process, with the caller's identity and the device work
injected: the rules on a real socket, hostile and slow clients, cancelling, stopping."""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from safeusb.errors import SafeUSBError
from safeusb.safeusbd import protocol as proto
from safeusb.safeusbd.client import DaemonError, DaemonUnavailable, ask
from safeusb.safeusbd.peer import Caller, Peer
from safeusb.safeusbd.protocol import DeviceArgs
from safeusb.safeusbd.server import Daemon, Done, Limits, activation_socket, bind_socket

ROOT = Caller(Peer(1, 0, 0), "root", why="uid 0")
G1 = Caller(Peer(2, 64055, 64055), "domain", "g1", why="cgroup of g1")
NOBODY = Caller(Peer(3, 65534, 65534), "other", why="not in a libvirt QEMU domain's cgroup")
HANG = 60.0  # only a bound on a hang: no test waits this long when it passes


@dataclass
class FakeActions:
    calls: list[tuple[str, DeviceArgs, Any]] = field(default_factory=list)
    gate: threading.Event | None = None  # prepare waits for this, or for its cancel
    started: threading.Event = field(default_factory=threading.Event)
    cancelled: list[bool] = field(default_factory=list)

    def inspect(self, args: DeviceArgs, caller_pid: int | None = None) -> dict[str, Any]:
        self.calls.append(("inspect", args, None))
        return {"free": True}

    def prepare(self, args: DeviceArgs, cancel: threading.Event) -> Done:
        self.calls.append(("prepare", args, None))
        self.started.set()
        if self.gate is not None:
            deadline = time.monotonic() + HANG
            while not (self.gate.is_set() or cancel.is_set()) and time.monotonic() < deadline:
                time.sleep(0.01)
            self.cancelled.append(cancel.is_set())
            if cancel.is_set():
                return Done(False, {"ok": False}, proto.FAILED, "cancelled; host state: as "
                            "before: every step was undone")
        return Done(True, {"ok": True, "host_state": "handed over"})

    def release(self, args: DeviceArgs, only_domain: str | None) -> Done:
        self.calls.append(("release", args, only_domain))
        return Done(True, {"ok": True, "host_state": "given back"})


@dataclass
class Running:
    daemon: Daemon
    path: str
    actions: FakeActions
    thread: threading.Thread

    def ask(self, op: str, args: dict[str, Any] | None = None) -> Any:
        return ask(op, args or {}, self.path, timeout=HANG)


def start(tmp_path: Path, caller: Caller, limits: Limits | None = None,
          others_may_inspect: bool = True, actions: FakeActions | None = None) -> Running:
    path = str(tmp_path / "d.sock")
    fake = actions or FakeActions()
    daemon = Daemon(bind_socket(path), lambda conn: caller, fake, limits or Limits(),
                    others_may_inspect)
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    return Running(daemon, path, fake, thread)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Any]:
    running: list[Running] = []

    def _start(caller: Caller, **kwargs: Any) -> Running:
        r = start(tmp_path, caller, **kwargs)
        running.append(r)
        return r

    yield _start
    for r in running:
        if r.actions.gate is not None:
            r.actions.gate.set()
        r.daemon.stop()
        r.thread.join(HANG)
        assert not r.thread.is_alive()


def raw_exchange(path: str, data: bytes, close_write: bool = True) -> list[dict[str, Any]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(HANG)
    s.connect(path)
    s.sendall(data)
    if close_write:
        s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return [json.loads(x) for x in out.splitlines()]


def test_root_may_ask_everything(served) -> None:  # type: ignore[no-untyped-def]
    r = served(ROOT)
    assert r.ask("ping")["caller"]["role"] == "root"
    assert r.ask("inspect", {"selector": "2-1"}) == {"free": True}
    assert r.ask("prepare", {"selector": "2-1", "domain": "g2"})["host_state"] == "handed over"
    assert r.ask("release", {"domain": "g2"})["host_state"] == "given back"
    assert [c[0] for c in r.actions.calls] == ["inspect", "prepare", "release"]
    assert r.actions.calls[2][2] is None  # root releases any record


def test_a_domain_acts_for_itself_only(served, caplog) -> None:  # type: ignore[no-untyped-def]
    r = served(G1)
    caplog.set_level(logging.INFO, logger="safeusb")
    assert r.ask("prepare", {"bus": 2, "addr": 3, "domain": "g1"})["ok"]
    r.ask("release", {"bus": 2, "addr": 3, "domain": "g1"})
    assert r.actions.calls[-1][2] == "g1"  # only records of g1 may be released
    for op in ("prepare", "release"):
        with pytest.raises(DaemonError) as err:
            r.ask(op, {"selector": "2-1", "domain": "g2"})
        assert err.value.kind == proto.NOT_PERMITTED and "not for 'g2'" in err.value.message
        with pytest.raises(DaemonError) as err:
            r.ask(op, {"selector": "2-1"})
        assert err.value.kind == proto.NOT_PERMITTED
    assert len(r.actions.calls) == 2
    refusals = [m for m in caplog.messages if "refused" in m]
    assert len(refusals) == 4 and all("QEMU of domain g1" in m for m in refusals)
    assert any("prepare bus 2 device 3 for domain g1" in m for m in caplog.messages)


def test_anyone_else_may_ping_and_inspect_only(served, caplog) -> None:  # type: ignore[no-untyped-def]
    r = served(NOBODY)
    assert r.ask("ping")["caller"] == {"pid": 3, "uid": 65534, "gid": 65534,
                                       "role": "other", "domain": None}
    assert r.ask("inspect", {"selector": "2-1"}) == {"free": True}
    for op in ("prepare", "release"):
        with pytest.raises(DaemonError) as err:
            r.ask(op, {"selector": "2-1", "domain": "g1"})
        assert err.value.kind == proto.NOT_PERMITTED
    assert [c[0] for c in r.actions.calls] == ["inspect"]
    assert sum("refused" in m and "uid 65534" in m for m in caplog.messages) == 2


def test_others_may_be_kept_to_ping(served) -> None:  # type: ignore[no-untyped-def]
    r = served(NOBODY, others_may_inspect=False)
    r.ask("ping")
    with pytest.raises(DaemonError) as err:
        r.ask("inspect", {"selector": "2-1"})
    assert err.value.kind == proto.NOT_PERMITTED and r.actions.calls == []


@pytest.mark.hostile
def test_bad_lines_are_answered_and_the_connection_goes_on(served) -> None:  # type: ignore[no-untyped-def]
    r = served(ROOT)
    replies = raw_exchange(r.path, b'{"version":1,"id":1,"op":"ping","args":{}}\n'
                                   b"NaN\n"
                                   b'{"version":1,"id":"x","op":"prepare","args":{"bus":1}}\n'
                                   b'{"version":1,"id":2,"op":"ping","args":{}}\n')
    assert [(x["id"], x["ok"]) for x in replies] == [(1, True), (None, False), ("x", False),
                                                     (2, True)]
    assert replies[1]["error"]["kind"] == proto.BAD_REQUEST


@pytest.mark.hostile
def test_an_oversized_line_ends_that_connection_only(served) -> None:  # type: ignore[no-untyped-def]
    r = served(ROOT)
    replies = raw_exchange(r.path, b"x" * (proto.MAX_REQUEST_LINE * 4) + b"\n")
    assert len(replies) == 1 and replies[0]["error"]["kind"] == proto.BAD_REQUEST
    assert "longer than" in replies[0]["error"]["message"]
    assert r.ask("ping")["protocol"] == 1


@pytest.mark.hostile
def test_a_silent_client_is_timed_out(served) -> None:  # type: ignore[no-untyped-def]
    r = served(ROOT, limits=Limits(request_timeout=0.2))
    replies = raw_exchange(r.path, b'{"version":1,', close_write=False)
    assert replies[0]["error"]["kind"] == proto.TIMEOUT


@pytest.mark.hostile
def test_a_flood_of_bad_and_slow_clients_does_not_stop_a_good_one(served) -> None:  # type: ignore[no-untyped-def]
    r = served(ROOT, limits=Limits(max_connections=64, request_timeout=HANG))
    r.actions.gate = threading.Event()
    hogs: list[socket.socket] = []
    try:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(r.path)  # a prepare that takes long
        slow.sendall(proto.request_line("prepare", {"selector": "2-1"}, 1))
        hogs.append(slow)
        assert r.actions.started.wait(HANG)
        for i in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(r.path)
            if i % 3 == 0:
                s.sendall(b"{" * 1000)  # an endless line, never finished
            elif i % 3 == 1:
                s.sendall(os.urandom(5000))
            hogs.append(s)  # and a third say nothing at all
        assert r.ask("ping")["server"] == "safeusbd"
        assert r.ask("inspect", {"selector": "1-1"}) == {"free": True}
    finally:
        r.actions.gate.set()
        for s in hogs:
            s.close()


@pytest.mark.hostile
def test_past_the_connection_limit_a_client_is_told_so(served) -> None:  # type: ignore[no-untyped-def]
    r = served(ROOT, limits=Limits(max_connections=2, request_timeout=HANG))
    hogs = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for s in hogs:
            s.connect(r.path)
        deadline = time.monotonic() + HANG
        while r.daemon._active < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(DaemonError) as err:
            r.ask("ping")
        assert err.value.kind == proto.OVERLOADED
    finally:
        for s in hogs:
            s.close()
    deadline = time.monotonic() + HANG
    while r.daemon._active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.ask("ping")["protocol"] == 1  # the slots come back


@pytest.mark.race
def test_hanging_up_cancels_a_prepare(served) -> None:  # type: ignore[no-untyped-def]
    r = served(ROOT)
    r.actions.gate = threading.Event()  # never set by the test: only a cancel ends it
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(r.path)
    s.sendall(proto.request_line("prepare", {"selector": "2-1", "domain": "g1"}, 1))
    assert r.actions.started.wait(HANG)
    s.close()
    deadline = time.monotonic() + HANG
    while not r.actions.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.actions.cancelled == [True]


@pytest.mark.race
def test_stopping_cancels_a_prepare_and_still_answers_it(served) -> None:  # type: ignore[no-untyped-def]
    r = served(ROOT)
    r.actions.gate = threading.Event()
    answer: list[BaseException] = []

    def client() -> None:
        try:
            r.ask("prepare", {"selector": "2-1"})
        except SafeUSBError as exc:
            answer.append(exc)

    t = threading.Thread(target=client)
    t.start()
    assert r.actions.started.wait(HANG)
    r.daemon.stop()
    t.join(HANG)
    r.thread.join(HANG)
    assert not r.thread.is_alive() and r.actions.cancelled == [True]
    assert isinstance(answer[0], DaemonError) and answer[0].kind == proto.FAILED
    assert "every step was undone" in answer[0].message


@pytest.mark.race
def test_a_client_that_cancels_gets_the_answer_after_the_undo(served) -> None:  # type: ignore[no-untyped-def]
    """ask(cancel=...) shuts its write side: the daemon cancels the prepare, and the
    answer, given once prepare has stopped, still reaches the client."""
    r = served(ROOT)
    r.actions.gate = threading.Event()  # never set: only a cancel ends the prepare
    cancel = threading.Event()
    answer: list[BaseException] = []

    def client() -> None:
        try:
            ask("prepare", {"selector": "2-1", "domain": "g1"}, r.path, timeout=HANG,
                cancel=cancel)
        except SafeUSBError as exc:
            answer.append(exc)

    t = threading.Thread(target=client)
    t.start()
    assert r.actions.started.wait(HANG)
    cancel.set()
    t.join(HANG)
    assert not t.is_alive() and r.actions.cancelled == [True]
    assert isinstance(answer[0], DaemonError) and answer[0].kind == proto.FAILED
    assert answer[0].message == "cancelled; host state: as before: every step was undone"


def test_the_gate_decision_asks_the_daemon_and_passes_its_reasons_on(served) -> None:  # type: ignore[no-untyped-def]
    from safeusb.gate.qemu_usb_host import UsbHostRequest, prepare_decision  # noqa: PLC0415

    refuse = FakeActions()
    r = served(ROOT, actions=refuse)
    request = UsbHostRequest(hostbus=2, hostaddr=3, domain="g1")
    prepare_decision(request, threading.Event(), r.path)  # allowed: returns
    assert [(c[0], c[1].as_json()) for c in r.actions.calls] == [
        ("prepare", {"bus": 2, "addr": 3, "domain": "g1"})]

    def refused(args: DeviceArgs, cancel: threading.Event) -> Done:
        return Done(False, {"ok": False}, proto.REFUSED,
                    "/dev/sdb mounted at /mnt in mount namespace 1; unmount it")

    refuse.prepare = refused  # type: ignore[method-assign]
    with pytest.raises(SafeUSBError) as err:
        prepare_decision(request, threading.Event(), r.path)
    assert str(err.value) == "/dev/sdb mounted at /mnt in mount namespace 1; unmount it"


def test_the_gate_decision_says_who_refused_what_is_not_a_reason(served) -> None:  # type: ignore[no-untyped-def]
    from safeusb.gate.qemu_usb_host import UsbHostRequest, prepare_decision  # noqa: PLC0415

    r = served(G1)
    with pytest.raises(SafeUSBError) as err:
        prepare_decision(UsbHostRequest(hostbus=2, hostaddr=3, domain="g2"),
                         threading.Event(), r.path)
    assert str(err.value).startswith("safeusbd: ") and "not for 'g2'" in str(err.value)
    assert r.actions.calls == []


def test_the_gate_decision_without_a_daemon_refuses_and_says_how_to_start_it(
        tmp_path: Path) -> None:
    from safeusb.gate.qemu_usb_host import UsbHostRequest, prepare_decision  # noqa: PLC0415

    path = str(tmp_path / "none.sock")
    with pytest.raises(DaemonUnavailable) as err:
        prepare_decision(UsbHostRequest(hostbus=2, hostaddr=3), threading.Event(), path)
    assert str(err.value) == (f"safeusbd is not running (no socket at {path}); start it with "
                              "`systemctl start safeusbd.socket`; nothing was done")


def test_an_idle_daemon_exits_when_told_to(tmp_path: Path) -> None:
    r = start(tmp_path, ROOT, limits=Limits(idle_exit=0.1))
    r.thread.join(HANG)
    assert not r.thread.is_alive()


def test_no_daemon_means_a_refusal_that_says_how_to_start_it(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnavailable) as err:
        ask("prepare", {"selector": "2-1"}, str(tmp_path / "none.sock"))
    assert "safeusbd is not running (no socket at" in str(err.value)
    assert "systemctl start safeusbd.socket" in str(err.value)
    assert "nothing was done" in str(err.value)
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))  # bound, never listening: what a dead daemon leaves
    s.close()
    with pytest.raises(DaemonUnavailable) as err:
        ask("ping", {}, str(stale))
    assert "nothing listens on" in str(err.value)
    assert "systemctl start safeusbd.socket" in str(err.value)


def test_binding_replaces_a_dead_socket_but_not_a_live_one_or_a_file(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    live = bind_socket(str(path))
    try:
        assert path.stat().st_mode & 0o777 == 0o666
        with pytest.raises(SafeUSBError, match="another safeusbd"):
            bind_socket(str(path))
    finally:
        live.close()
    other = tmp_path / "file"
    other.write_text("x")
    with pytest.raises(SafeUSBError, match="not a socket"):
        bind_socket(str(other))


def test_activation_socket_only_for_this_pid_and_exactly_one() -> None:
    assert activation_socket({}, 100) is None
    assert activation_socket({"LISTEN_PID": "99", "LISTEN_FDS": "1"}, 100) is None
    with pytest.raises(SafeUSBError, match="exactly one"):
        activation_socket({"LISTEN_PID": "100", "LISTEN_FDS": "2"}, 100)


_ACTIVATE = """
import os, socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(8)
if listener.fileno() != 3:
    os.dup2(listener.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.executable, [sys.executable, "-m", "safeusb.safeusbd.server", *sys.argv[2:]])
"""


def test_socket_activated_it_serves_the_socket_passed_and_exits_when_idle(
        tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    policy = tmp_path / "policy.toml"
    policy.write_text("[defaults]\n")
    proc = subprocess.Popen([sys.executable, "-c", _ACTIVATE, str(path), "--idle-exit", "0.5",
                             "--policy", str(policy), "--state-dir", str(tmp_path / "st"),
                             "--socket", str(tmp_path / "unused.sock")],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HANG
        reply = None
        while reply is None and time.monotonic() < deadline:
            try:
                reply = ask("ping", {}, str(path), timeout=HANG)
            except DaemonUnavailable:
                time.sleep(0.05)  # the listener is bound before the daemon runs
        assert reply is not None and reply["server"] == "safeusbd"
        _, err = proc.communicate(timeout=HANG)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert "socket passed by systemd" in err and "idle for 0.5 s; exiting" in err
    assert not (tmp_path / "unused.sock").exists()


def test_preload_imports_what_requests_use() -> None:
    """The names safeusbd imports before its first request are the package's modules (a
    renamed module fails here instead of costing the first decision its import), and the
    mode-switch database is read into the roots the requests are read through."""
    import sys  # noqa: PLC0415

    from safeusb.host.roots import Roots  # noqa: PLC0415
    from safeusb.safeusbd import server as daemon  # noqa: PLC0415

    roots = Roots.host()
    daemon._preload(roots)
    for name in ("handover.transaction", "host.journal", "host.runner", "handover.service",
                 "handover.steps", "host.snapshot"):
        assert f"safeusb.{name}" in sys.modules
    assert "modeswitch" in roots.kept


def test_a_prepares_log_line_says_where_its_time_went() -> None:
    from safeusb.safeusbd.server import _took  # noqa: PLC0415

    outcome = {"read_seconds": 0.25, "done": ["flush /dev/sda", "hand over 1-1"],
               "seconds": [0.02, 0.3]}
    assert _took(outcome) == ": read and decided 250 ms; flush /dev/sda 20 ms; hand over 1-1 300 ms"
    assert _took({"read_seconds": None, "done": [], "seconds": []}) == ""


def test_the_hangup_watch_ends_with_the_op_not_on_a_clock(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The op's answer waits for the watch to end: it must end when the op does, not at
    its next look (a 200 ms poll added up to 200 ms to every prepare)."""
    import safeusb.safeusbd.server as daemon_mod  # noqa: PLC0415

    timeouts: list[object] = []
    real_poll = select.poll

    class Poll:
        def __init__(self) -> None:
            self.p = real_poll()

        def register(self, fd: int, mask: int) -> None:
            self.p.register(fd, mask)

        def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
            timeouts.append(timeout)
            return self.p.poll(timeout)

    monkeypatch.setattr(daemon_mod.select, "poll", Poll)
    a, b = socket.socketpair()
    cancel = threading.Event()
    try:
        with daemon_mod._cancel_on_hangup(a, cancel):
            pass
        assert timeouts == [None]  # one look, woken by the op's end
        assert not cancel.is_set()
        with daemon_mod._cancel_on_hangup(a, cancel):
            b.close()  # the caller hangs up
            deadline = time.monotonic() + HANG
            while not cancel.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        assert cancel.is_set()
    finally:
        a.close()
        b.close()
