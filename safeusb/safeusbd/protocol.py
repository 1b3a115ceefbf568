"""The safeusbd protocol, version 1: one JSON object per line each way (docs/safeusbd.md).

Parsing is strict, so that the daemon and every client read a message the same way: no
NaN or infinities, no duplicate keys, exact types, no unknown fields, bounded lengths.
"""

from __future__ import annotations

import json
from typing import Any

from safeusb import strictjson
from safeusb.errors import SafeUSBError
from safeusb.host import defaults
from safeusb.values import frozen

VERSION = 1
DEFAULT_SOCKET = defaults.SOCKET
MAX_REQUEST_LINE = 16 * 1024  # bytes, newline included
MAX_REPLY_LINE = 64 * 1024 * 1024
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 4096
OPS = ("ping", "inspect", "prepare", "release")
ACTING_OPS = ("prepare", "release")
_REQUEST_KEYS = frozenset({"version", "id", "op", "args"})
_MAX_ID_INT = 2**53

# Arguments each op accepts, and their types ("number": int or float, never bool).
_ARGS: dict[str, dict[str, str]] = {
    "ping": {},
    "inspect": {"selector": "text", "bus": "int", "addr": "int"},
    "prepare": {"selector": "text", "bus": "int", "addr": "int", "domain": "text",
                "timeout": "number"},
    "release": {"selector": "text", "bus": "int", "addr": "int", "domain": "text"},
}

# Error kinds on the wire (docs/safeusbd.md lists what each means).
BAD_REQUEST = "bad-request"
UNSUPPORTED_VERSION = "unsupported-version"
NOT_PERMITTED = "not-permitted"
BAD_SELECTOR = "bad-selector"
NO_SUCH_DEVICE = "no-such-device"
BUSY = "busy"
REFUSED = "refused"
FAILED = "failed"
POLICY = "policy"
STATE = "state"
OVERLOADED = "overloaded"
TIMEOUT = "timeout"
SHUTTING_DOWN = "shutting-down"
INTERNAL = "internal"
ERROR_KINDS = (BAD_REQUEST, UNSUPPORTED_VERSION, NOT_PERMITTED, BAD_SELECTOR, NO_SUCH_DEVICE,
               BUSY, REFUSED, FAILED, POLICY, STATE, OVERLOADED, TIMEOUT, SHUTTING_DOWN,
               INTERNAL)


class ProtocolError(SafeUSBError):
    """A message that breaks the protocol, or an error to send as one."""

    exit_code = 1

    def __init__(self, kind: str, message: str, request_id: str | int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.request_id = request_id


@frozen
class DeviceArgs:
    """The arguments of an op, checked: which device, for which domain."""

    selector: str | None = None
    bus: int | None = None
    addr: int | None = None
    domain: str | None = None
    timeout: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in (("selector", self.selector), ("bus", self.bus),
                                  ("addr", self.addr), ("domain", self.domain),
                                  ("timeout", self.timeout)) if v is not None}

    def names_device(self) -> bool:
        return self.selector is not None or self.bus is not None

    def describe(self) -> str:
        if self.selector is not None and self.bus is not None:
            return f"{self.selector} (bus {self.bus} device {self.addr})"
        if self.selector is not None:
            return self.selector
        if self.bus is not None:
            return f"bus {self.bus} device {self.addr}"
        return f"every device of domain {self.domain}"


@frozen
class Request:
    id: str | int
    op: str
    args: DeviceArgs


def strict_loads(data: bytes) -> Any:
    """JSON as RFC 8259 has it, and nothing Python adds: ValueError otherwise."""
    return strictjson.loads(data, finite=True)


def _text(value: str, what: str) -> str:
    if not value or len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"{what} must be 1 to {MAX_TEXT_CHARS} characters")
    if "\0" in value or any("\ud800" <= c <= "\udfff" for c in value):
        raise ValueError(f"{what} holds a NUL or a lone surrogate")
    return value


def _typed(value: Any, kind: str, what: str) -> Any:
    if kind == "text":
        if not isinstance(value, str):
            raise ValueError(f"{what} must be a string")
        return _text(value, what)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{what} must be an integer")
        if not 1 <= value <= 999:
            raise ValueError(f"{what} must be 1 to 999")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number")
    from safeusb.handover.policy import check_timeout  # noqa: PLC0415 (one rule for every timeout)

    return check_timeout(value)


def _request_id(doc: dict[str, Any]) -> str | int | None:
    """The id to answer with, when it is well formed (even if the rest is not)."""
    value = doc.get("id")
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS \
            and not any("\ud800" <= c <= "\udfff" for c in value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < _MAX_ID_INT:
        return value
    return None


def parse_request(line: bytes) -> Request:
    """A request line (without its newline), or ProtocolError saying what is wrong."""
    try:
        doc = strict_loads(line)
    except ValueError as exc:
        raise ProtocolError(BAD_REQUEST, f"not a JSON request: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(BAD_REQUEST, f"a request is a JSON object, not a "
                                         f"{type(doc).__name__}")
    rid = _request_id(doc)
    if "version" not in doc or isinstance(doc["version"], bool) \
            or not isinstance(doc["version"], int):
        raise ProtocolError(BAD_REQUEST, "'version' must be an integer", rid)
    if doc["version"] != VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION, f"protocol version {doc['version']} is not "
                                                 f"supported; this daemon speaks {VERSION}", rid)
    unknown = set(doc) - _REQUEST_KEYS
    if unknown:
        raise ProtocolError(BAD_REQUEST, f"unknown field {sorted(unknown)[0]!r}", rid)
    missing = _REQUEST_KEYS - set(doc)
    if missing:
        raise ProtocolError(BAD_REQUEST, f"missing field {sorted(missing)[0]!r}", rid)
    if rid is None:
        raise ProtocolError(BAD_REQUEST, f"'id' must be a string of 1 to {MAX_ID_CHARS} "
                                         "characters or an integer below 2**53")
    op = doc["op"]
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(BAD_REQUEST, f"'op' must be one of {', '.join(OPS)}", rid)
    return Request(rid, op, _parse_args(op, doc["args"], rid))


def _parse_args(op: str, raw: Any, rid: str | int) -> DeviceArgs:
    if not isinstance(raw, dict):
        raise ProtocolError(BAD_REQUEST, "'args' must be an object", rid)
    allowed = _ARGS[op]
    unknown = set(raw) - set(allowed)
    if unknown:
        raise ProtocolError(BAD_REQUEST, f"{op}: unknown argument {sorted(unknown)[0]!r}", rid)
    values: dict[str, Any] = {}
    try:
        for key, value in raw.items():
            values[key] = _typed(value, allowed[key], f"{op}: {key!r}")
    except ValueError as exc:
        raise ProtocolError(BAD_REQUEST, str(exc), rid) from None
    args = DeviceArgs(**values)
    if (args.bus is None) != (args.addr is None):
        raise ProtocolError(BAD_REQUEST, f"{op}: give 'bus' and 'addr' together", rid)
    if op in ("inspect", "prepare") and not args.names_device():
        raise ProtocolError(BAD_REQUEST, f"{op}: give 'selector', or 'bus' and 'addr'", rid)
    if op == "release" and not args.names_device() and args.domain is None:
        raise ProtocolError(BAD_REQUEST, "release: give a device ('selector', or 'bus' and "
                                         "'addr'), or a 'domain' to release all of it", rid)
    return args


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode() + b"\n"


def request_line(op: str, args: dict[str, Any], request_id: str | int) -> bytes:
    return encode({"version": VERSION, "id": request_id, "op": op, "args": args})


def ok_reply(request_id: str | int | None, result: Any) -> bytes:
    return encode({"version": VERSION, "id": request_id, "ok": True, "result": result})


def error_reply(request_id: str | int | None, kind: str, message: str,
                outcome: dict[str, Any] | None = None) -> bytes:
    error: dict[str, Any] = {"kind": kind, "message": message}
    if outcome is not None:
        error["outcome"] = outcome
    return encode({"version": VERSION, "id": request_id, "ok": False, "error": error})


@frozen
class Reply:
    id: str | int | None
    ok: bool
    result: Any = None
    error_kind: str | None = None
    error_message: str | None = None
    outcome: dict[str, Any] | None = None


def parse_reply(line: bytes) -> Reply:
    """A reply line from the daemon; ValueError when it is not one."""
    doc = strict_loads(line)
    if not isinstance(doc, dict) or doc.get("version") != VERSION \
            or isinstance(doc.get("version"), bool) or not isinstance(doc.get("ok"), bool):
        raise ValueError("not a version 1 reply")
    rid = doc.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int)):
        raise ValueError("the reply's id is neither a string, an integer nor null")
    if doc["ok"]:
        if set(doc) != {"version", "id", "ok", "result"}:
            raise ValueError("a successful reply has version, id, ok and result only")
        return Reply(rid, True, doc["result"])
    error = doc.get("error")
    if set(doc) != {"version", "id", "ok", "error"} or not isinstance(error, dict) \
            or not isinstance(error.get("kind"), str) \
            or not isinstance(error.get("message"), str) \
            or not set(error) <= {"kind", "message", "outcome"}:
        raise ValueError("a failed reply has version, id, ok and error (kind, message)")
    outcome = error.get("outcome")
    if outcome is not None and not isinstance(outcome, dict):
        raise ValueError("the error's outcome is not an object")
    return Reply(rid, False, None, error["kind"], error["message"], outcome)
