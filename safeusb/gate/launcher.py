"""The gate: QEMU's emulator path for a protected domain, guarding its QMP monitor.

libvirt starts the domain's `<emulator>` with QEMU's full argument list. The gate swaps the
monitor's listening socket for a private one, starts a proxy process, and execs the real
QEMU in its own process, so libvirt's pid is QEMU's: libvirt's kill, cgroups and
statistics act on QEMU itself. The proxy passes every QMP message through unchanged,
fds included, except `device_add` of a `usb-host` device, which reaches QEMU only if the
decision allows it; otherwise libvirt gets a QMP error naming the reason.

If the proxy dies, the guest keeps running: right after capability negotiation the proxy
hands QEMU (with `getfd`, name `safeusb-keepalive`) a copy of its end of libvirt's
connection, so libvirt never sees the monitor end while QEMU lives. Monitor commands then
get no answer (no device reaches the guest: fail closed); `virsh destroy` still ends the
guest, and when QEMU exits libvirt sees the end of the monitor as usual.

This module is the executable (the launcher); gate.session holds the decisions about the
stream and touches no socket; gate.proxy does the I/O.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import socket
import sys
import tempfile
import traceback
from collections.abc import Sequence

from safeusb.errors import EXIT_IN_USE, EXIT_USAGE, SafeUSBError, UsageError
from safeusb.gate.proxy import PROG, run_proxy, say
from safeusb.gate.qemu_usb_host import (
    Decide,
    prepare_decision,
)
from safeusb.gate.qemuargs import (
    MonitorArgsError,
    MonitorSocket,
    domain_name,
    find_monitor,
    with_monitor_fd,
)
from safeusb.gate.session import DECISION_TIMEOUT
from safeusb.values import frozen

GATE_ROOT = "/usr/local/lib/safeusb/gate"

# The executable


@frozen
class GateArgs:
    real_emulator: str
    qemu_args: tuple[str, ...]
    decision: str | None = None
    timeout: float = DECISION_TIMEOUT
    daemon_socket: str | None = None  # safeusbd's socket; None: its standard place


def launcher_path(real_emulator: str, root: str = GATE_ROOT) -> str:
    """Where the gate's launcher for a real emulator lives: GATE_ROOT + its path."""
    if not os.path.isabs(real_emulator) or os.path.normpath(real_emulator) != real_emulator:
        raise UsageError(f"emulator path must be absolute and normal: {real_emulator!r}")
    if is_gate_path(real_emulator, root):
        raise UsageError(f"{real_emulator} is a gate already")
    return root + real_emulator


def is_gate_path(path: str, root: str = GATE_ROOT) -> bool:
    return path == root or path.startswith(root + "/")


def parse_gate_argv(argv: Sequence[str], root: str = GATE_ROOT) -> GateArgs:
    """`GATE_ROOT/usr/bin/qemu-system-x86_64 QEMU-ARGS...` (how libvirt runs it), or
    `safeusb-qemu-gate --real-emulator PATH [--decision MODULE:FUNCTION]
    [--decision-timeout SECONDS] [--daemon-socket PATH] -- QEMU-ARGS...` (for tests)."""
    prog = argv[0] if argv else PROG
    if is_gate_path(prog, root):
        real = prog[len(root):]
        if not real.startswith("/") or os.path.normpath(real) != real or is_gate_path(real, root):
            raise UsageError(f"{prog}: names no real emulator below {root}")
        return GateArgs(real, tuple(argv[1:]))
    real_emulator: str | None = None
    decision: str | None = None
    daemon_socket: str | None = None
    timeout = DECISION_TIMEOUT
    rest = list(argv[1:])
    while rest and rest[0] != "--":
        opt = rest.pop(0)
        if opt in ("--real-emulator", "--decision", "--decision-timeout",
                   "--daemon-socket") and rest:
            value = rest.pop(0)
            if opt == "--real-emulator":
                real_emulator = value
            elif opt == "--decision":
                decision = value
            elif opt == "--daemon-socket":
                if not os.path.isabs(value):
                    raise UsageError(f"{PROG}: --daemon-socket must be an absolute path")
                daemon_socket = value
            else:
                try:
                    timeout = float(value)
                except ValueError:
                    timeout = math.nan
                if not math.isfinite(timeout) or timeout <= 0:
                    raise UsageError(f"{PROG}: --decision-timeout {value!r}: give a positive "
                                     "number of seconds")
        else:
            raise UsageError(f"{PROG}: unknown argument {opt!r}; usage: {PROG} "
                             "--real-emulator PATH [--decision MODULE:FUNCTION] "
                             "[--decision-timeout SECONDS] [--daemon-socket PATH] "
                             "-- QEMU-ARGS")
    if real_emulator is None:
        raise UsageError(f"{PROG}: --real-emulator PATH is required when not run as "
                         f"{root}/<emulator path>")
    if not os.path.isabs(real_emulator) or is_gate_path(real_emulator, root):
        raise UsageError(f"{PROG}: --real-emulator must be an absolute path outside {root}")
    return GateArgs(real_emulator, tuple(rest[1:]), decision, timeout, daemon_socket)


def load_decision(spec: str | None, daemon_socket: str | None = None) -> Decide:
    """The decision: by default, asking safeusbd (at daemon_socket, else its standard
    place) to prepare the device; MODULE:FUNCTION in tests."""
    if spec is None:
        from safeusb.safeusbd import client  # noqa: F401, PLC0415 (now: the first decision pays no import)

        return functools.partial(prepare_decision, socket_path=daemon_socket)
    module, sep, func = spec.partition(":")
    if not sep or not module or not func:
        raise UsageError(f"--decision {spec!r}: give MODULE:FUNCTION")
    import importlib  # noqa: PLC0415

    fn = getattr(importlib.import_module(module), func)
    if not callable(fn):
        raise UsageError(f"--decision {spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


def start_guarded(ga: GateArgs, mon: MonitorSocket, decide: Decide) -> int:
    """Proxy in a detached grandchild; then this process becomes QEMU."""
    # Named, not probed: tempfile's search writes test files that QEMU's confinement
    # (AppArmor's libvirt-qemu abstraction and safeusb's rules) does not allow.
    tmp = os.environ.get("TMPDIR", "")
    private = tempfile.mkdtemp(prefix="safeusb-gate-",
                               dir=tmp if os.path.isabs(tmp) and os.path.isdir(tmp) else "/tmp")  # noqa: S108
    qemu_path = os.path.join(private, "monitor.sock")
    qemu_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu_listener.bind(qemu_path)
    qemu_listener.listen(1)
    if mon.fd is not None:
        client_fd = mon.fd
    else:
        assert mon.path is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(mon.path)
        libvirt_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        libvirt_listener.bind(mon.path)
        libvirt_listener.listen(1)
        client_fd = libvirt_listener.detach()
        os.set_inheritable(client_fd, True)
    args = with_monitor_fd(ga.qemu_args, mon, qemu_listener.fileno())
    qemu_listener.set_inheritable(True)
    pidfd = os.pidfd_open(os.getpid())
    domain = domain_name(ga.qemu_args)
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            qemu_listener.close()
            say(f"guards the QMP monitor of {domain or 'a domain'}")
            listener = socket.socket(fileno=os.dup(client_fd))
            run_proxy(listener, qemu_path, pidfd, decide, domain, ga.timeout)
            code = 0
        except BaseException:
            say("proxy failed:\n" + traceback.format_exc())
        finally:
            shutil.rmtree(private, ignore_errors=True)
            os._exit(code)
    os.waitpid(child, 0)
    os.close(pidfd)
    try:
        os.execv(ga.real_emulator, [ga.real_emulator, *args])  # noqa: S606 (argument list)
    except OSError as exc:
        say(f"cannot run {ga.real_emulator}: {exc}")
    return EXIT_IN_USE


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        ga = parse_gate_argv(argv)
        mon = find_monitor(ga.qemu_args)
        if mon is None:
            os.execv(ga.real_emulator, [ga.real_emulator, *ga.qemu_args])  # noqa: S606
        decide = load_decision(ga.decision, ga.daemon_socket)
    except MonitorArgsError as exc:
        say(f"refusing to start QEMU: {exc}")
        return EXIT_IN_USE
    except SafeUSBError as exc:
        say(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        say(f"cannot run the emulator: {exc}")
        return EXIT_IN_USE
    return start_guarded(ga, mon, decide)


if __name__ == "__main__":
    sys.exit(main())
