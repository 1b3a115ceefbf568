"""safeusbd as root on this host: callers told apart by the kernel's credentials, a real
prepare and release of a loop device through it, floods, and what a client says when the
daemon is gone."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from safeusb.safeusbd import protocol as proto
from safeusb.safeusbd.client import DaemonError, DaemonUnavailable, ask
from tests.conftest import ROOT, require_root
from tests.host.conftest import Loop, background, wait_for
from tests.host.test_prepare_host import UNMOUNT, _mounted_in, _ns_mount

pytestmark = pytest.mark.host
SAFEUSBD = ROOT / ".venv" / "bin" / "safeusbd"
HANG = 120.0  # a bound on a hang only


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    socket: str
    log: Path

    def ask(self, op: str, args: dict[str, object] | None = None) -> object:
        return ask(op, args or {}, self.socket, timeout=HANG)

    def logged(self) -> str:
        return self.log.read_text()


@pytest.fixture
def safeusbd(tmp_path: Path) -> Iterator[Served]:
    with serve_safeusbd(tmp_path) as served:
        yield served


@contextlib.contextmanager
def serve_safeusbd(tmp_path: Path) -> Iterator[Served]:
    """safeusbd from .venv on a socket of its own, policy mount = "unmount"."""
    require_root()
    if not SAFEUSBD.exists():
        pytest.skip(f"{SAFEUSBD} is not installed (pip install -e . in .venv)")
    # Searchable by others, like /run/safeusb, so an unprivileged client can reach it.
    sockdir = tempfile.mkdtemp(prefix="safeusbd-")
    os.chmod(sockdir, 0o711)
    policy = tmp_path / "policy.toml"
    policy.write_text(UNMOUNT)
    log = tmp_path / "safeusbd.log"
    path = os.path.join(sockdir, "safeusbd.sock")
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(SAFEUSBD), "--socket", path, "--policy", str(policy),
                                 "--state-dir", str(tmp_path / "state"),
                                 "--request-timeout", "5"], stderr=err)
    served = Served(proc, path, log)
    try:
        wait_for(lambda: os.path.exists(path) and _answers(served), timeout=HANG)
        yield served
    finally:
        proc.terminate()
        proc.wait(HANG)
        shutil.rmtree(sockdir, ignore_errors=True)


def _answers(served: Served) -> bool:
    try:
        served.ask("ping")
    except DaemonUnavailable:
        return False
    return True


def test_root_may_ping_and_inspect(safeusbd: Served, loop_ext4: Loop) -> None:
    ping = safeusbd.ask("ping")
    assert isinstance(ping, dict) and ping["caller"]["role"] == "root"
    assert ping["caller"]["pid"] == os.getpid()
    found = safeusbd.ask("inspect", {"selector": loop_ext4.node})
    assert isinstance(found, dict) and found["free"] is True
    assert loop_ext4.name in json.dumps(found["block_devices"])


_AS_NOBODY = """
import json, sys
from safeusb.safeusbd.client import DaemonError, ask
out = {}
for op, args in (("ping", {}), ("inspect", {"selector": sys.argv[2]}),
                 ("prepare", {"selector": sys.argv[2], "domain": "g1"}),
                 ("release", {"selector": sys.argv[2], "domain": "g1"})):
    try:
        out[op] = {"ok": True, "result": ask(op, args, sys.argv[1], timeout=60)}
    except DaemonError as exc:
        out[op] = {"ok": False, "kind": exc.kind, "message": exc.message}
print(json.dumps(out))
"""


def test_nobody_may_ping_and_inspect_but_not_act(safeusbd: Served, loop_ext4: Loop) -> None:
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-c", _AS_NOBODY, safeusbd.socket, loop_ext4.node],
                       capture_output=True, text=True, timeout=HANG, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    caller = out["ping"]["result"]["caller"]
    assert (caller["uid"], caller["role"]) == (65534, "other")
    assert out["inspect"]["ok"] and "free" in out["inspect"]["result"]
    for op in ("prepare", "release"):
        assert (out[op]["ok"], out[op]["kind"]) == (False, proto.NOT_PERMITTED), out
        assert "only root or a QEMU process" in out[op]["message"]
        assert f"uid 65534 (other): {op} {loop_ext4.node} refused" in safeusbd.logged()


def test_prepare_and_release_a_loop_device_through_the_daemon(
        safeusbd: Served, loop_ext4: Loop, tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    with background(_ns_mount(loop_ext4, mnt)) as proc:
        wait_for(lambda: _mounted_in(proc.pid, mnt))
        done = safeusbd.ask("prepare", {"selector": loop_ext4.node, "domain": "g1"})
        assert isinstance(done, dict) and done["ok"] and done["host_state"] == "handed over"
        assert not _mounted_in(proc.pid, mnt)
        with pytest.raises(DaemonError) as err:  # another domain cannot have it now
            safeusbd.ask("prepare", {"selector": loop_ext4.node, "domain": "g2"})
        assert err.value.kind == proto.BUSY and "domain g1" in err.value.message
        back = safeusbd.ask("release", {"selector": loop_ext4.node, "domain": "g1"})
        assert isinstance(back, dict) and back["ok"]
        assert _mounted_in(proc.pid, mnt)
    log = safeusbd.logged()
    assert f"prepare {loop_ext4.node} for domain g1" in log and "done (handed over)" in log


def test_a_refusal_comes_back_with_the_reasons(safeusbd: Served, loop_ext4: Loop,
                                               tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    with background(["unshare", "-m", "--propagation", "private", "sh", "-c",
                     f"mount {loop_ext4.node} {mnt} && cd {mnt} && exec sleep 600"]) as proc:
        mnt.mkdir(exist_ok=True)
        wait_for(lambda: _mounted_in(proc.pid, mnt))
        with pytest.raises(DaemonError) as err:  # its working directory is on it
            safeusbd.ask("prepare", {"selector": loop_ext4.node, "domain": "g1"})
        assert err.value.kind == proto.REFUSED and "sleep" in err.value.message
        assert err.value.outcome is not None and err.value.outcome["refused"]
        assert _mounted_in(proc.pid, mnt)


_FLOOD = """
import os, socket, sys, time
hogs = []
for i in range(60):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    try:
        if i % 3 == 0:
            s.sendall(b"x" * 40000)  # oversized
        elif i % 3 == 1:
            s.sendall(b'{"version": 1, "id": ')  # and never the rest
    except OSError:
        pass  # turned away
    hogs.append(s)
print("flooding", flush=True)
time.sleep(600)
"""


@pytest.mark.hostile
def test_a_flood_from_a_user_does_not_stop_root_being_answered(safeusbd: Served) -> None:
    with background(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                     sys.executable, "-c", _FLOOD, safeusbd.socket],
                    stdout=subprocess.PIPE) as flood:
        assert flood.stdout is not None and flood.stdout.readline() == b"flooding\n"
        ping = safeusbd.ask("ping")
        assert isinstance(ping, dict) and ping["server"] == "safeusbd"
        assert "connection limit reached (uid 65534)" in safeusbd.logged()
    assert safeusbd.proc.poll() is None


def test_stopped_daemon_leaves_no_socket_and_the_client_says_how_to_start_it(
        safeusbd: Served) -> None:
    safeusbd.proc.send_signal(signal.SIGTERM)
    assert safeusbd.proc.wait(HANG) == 0
    assert not os.path.exists(safeusbd.socket)
    with pytest.raises(DaemonUnavailable) as err:
        ask("prepare", {"selector": "2-1", "domain": "g1"}, safeusbd.socket)
    assert "safeusbd is not running" in str(err.value)
    assert "systemctl start safeusbd.socket" in str(err.value)
