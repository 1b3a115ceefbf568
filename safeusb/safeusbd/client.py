"""Asking safeusbd. When the daemon cannot be reached, nothing is done and the caller is
told so and how to start it: every front end that asks fails closed."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import time
from typing import Any

from safeusb.errors import SafeUSBError
from safeusb.safeusbd import protocol as proto

START_HINT = "start it with `systemctl start safeusbd.socket`"
CANCEL_POLL = 0.1  # seconds between looks at a cancel event while waiting for a reply
_ids = itertools.count(1)


class DaemonUnavailable(SafeUSBError):
    """safeusbd is not running or cannot be reached; nothing was done."""

    exit_code = 1


class DaemonError(SafeUSBError):
    """safeusbd answered with an error (refused, not permitted, bad request, ...)."""

    exit_code = 1

    def __init__(self, kind: str, message: str, outcome: dict[str, Any] | None = None) -> None:
        super().__init__(f"safeusbd: {message}" if kind != proto.REFUSED else message)
        self.kind = kind
        self.message = message
        self.outcome = outcome


def _unreachable(socket_path: str, exc: OSError) -> DaemonUnavailable:
    if exc.errno == errno.ENOENT:
        why = f"safeusbd is not running (no socket at {socket_path})"
    elif exc.errno == errno.ECONNREFUSED:
        why = f"safeusbd is not running (nothing listens on {socket_path})"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = f"safeusbd's socket {socket_path} cannot be reached: permission denied"
    else:
        why = f"safeusbd cannot be reached at {socket_path}: {exc.strerror or exc}"
    return DaemonUnavailable(f"{why}; {START_HINT}; nothing was done")


def ask(op: str, args: dict[str, Any], socket_path: str,
        timeout: float | None = None, cancel: threading.Event | None = None) -> Any:
    """Send one request and return its result; DaemonError for an error reply,
    DaemonUnavailable when there is no daemon to ask (fail closed).

    ``timeout`` bounds the whole exchange (None: wait as long as prepare takes; hanging up
    early cancels a prepare, which undoes what it did). ``cancel``, once set, asks the
    daemon to cancel (the connection's write side is shut down) and the reply is still
    awaited: for a prepare, it comes once the daemon has undone what it did."""
    if op not in proto.OPS:
        raise ValueError(f"unknown op {op!r}")
    request_id = f"{os.getpid()}-{next(_ids)}"
    line = proto.request_line(op, args, request_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            raise _unreachable(socket_path, exc) from None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR, errno.EACCES):
                raise _unreachable(socket_path, exc) from None
            raise
        try:
            sock.sendall(line)
            raw = _read_line(sock, deadline, cancel)
        except TimeoutError:
            raise DaemonError(proto.TIMEOUT, f"no answer within {timeout:g} s") from None
        except OSError as exc:
            raise DaemonError(proto.FAILED, f"connection to safeusbd lost: "
                              f"{exc.strerror or exc}; the request may or may not have "
                              "been carried out") from None
    finally:
        sock.close()
    try:
        reply = proto.parse_reply(raw)
    except ValueError as exc:
        raise DaemonError(proto.BAD_REQUEST, f"unreadable answer: {exc}") from None
    if reply.id not in (request_id, None):
        raise DaemonError(proto.BAD_REQUEST, f"answer to another request ({reply.id!r})")
    if not reply.ok:
        assert reply.error_kind is not None and reply.error_message is not None
        raise DaemonError(reply.error_kind, reply.error_message, reply.outcome)
    return reply.result


def _read_line(sock: socket.socket, deadline: float | None,
               cancel: threading.Event | None = None) -> bytes:
    chunks: list[bytes] = []
    size = 0
    signalled = False
    while True:
        if cancel is not None and not signalled and cancel.is_set():
            # The daemon reads the end of our writing as hanging up: it cancels the
            # request, undoes what it did and still answers on the open read side.
            sock.shutdown(socket.SHUT_WR)
            signalled = True
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            raise TimeoutError
        if cancel is not None and not signalled:
            wait = CANCEL_POLL if wait is None else min(wait, CANCEL_POLL)
        sock.settimeout(wait)
        try:
            chunk = sock.recv(1024 * 1024)
        except TimeoutError:
            continue  # the deadline, or a look at cancel
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "safeusbd closed the connection "
                                       "without an answer")
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > proto.MAX_REPLY_LINE:
            raise ConnectionResetError(errno.EMSGSIZE, "answer too long")
