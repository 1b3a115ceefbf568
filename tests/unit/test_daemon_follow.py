"""safeusbd stays up while it follows something, and tells the event thread when a
prepare or release finished."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from safeusb.safeusbd.client import ask
from safeusb.safeusbd.server import Daemon, Limits, bind_socket
from tests.unit.test_daemon_server import HANG, ROOT, FakeActions


def test_idle_exit_waits_while_something_is_followed(tmp_path: Path) -> None:
    following = threading.Event()
    following.set()
    asked = []

    def keep_alive() -> bool:
        asked.append(time.monotonic())
        return following.is_set()

    daemon = Daemon(bind_socket(str(tmp_path / "d.sock")), lambda conn: ROOT, FakeActions(),
                    Limits(idle_exit=0.05), keep_alive=keep_alive)
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + HANG
    while len(asked) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(asked) >= 3 and thread.is_alive()  # idle three times over, still up
    following.clear()
    thread.join(HANG)
    assert not thread.is_alive()


def test_a_keep_alive_that_fails_keeps_it_up(tmp_path: Path) -> None:
    calls = []

    def broken() -> bool:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("cannot tell")
        return False

    daemon = Daemon(bind_socket(str(tmp_path / "d.sock")), lambda conn: ROOT, FakeActions(),
                    Limits(idle_exit=0.05), keep_alive=broken)
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    thread.join(HANG)
    assert not thread.is_alive() and len(calls) == 3


def test_prepare_and_release_poke_the_follower(tmp_path: Path) -> None:
    done: list[str] = []
    path = str(tmp_path / "d.sock")
    daemon = Daemon(bind_socket(path), lambda conn: ROOT, FakeActions(), Limits(),
                    on_done=done.append)
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        ask("prepare", {"selector": "2-1", "domain": "g1"}, path, timeout=HANG)
        ask("release", {"selector": "2-1", "domain": "g1"}, path, timeout=HANG)
        ask("ping", {}, path, timeout=HANG)
    finally:
        daemon.stop()
        thread.join(HANG)
    assert done == ["prepare", "release"]
