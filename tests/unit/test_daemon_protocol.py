"""safeusbd's protocol: strict parsing of requests and replies, hostile input included."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safeusb.safeusbd import protocol as proto
from safeusb.safeusbd.protocol import DeviceArgs, ProtocolError, parse_reply, parse_request


def line(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def req(op: str = "ping", args: Any = None, **extra: Any) -> bytes:
    doc = {"version": 1, "id": "r1", "op": op, "args": {} if args is None else args}
    doc.update(extra)
    return line(doc)


def kind_of(raw: bytes) -> str:
    with pytest.raises(ProtocolError) as err:
        parse_request(raw)
    return err.value.kind


def test_requests_of_every_op_parse() -> None:
    assert parse_request(req()).op == "ping"
    r = parse_request(req("prepare", {"selector": "2-1", "bus": 2, "addr": 3,
                                      "domain": "g1", "timeout": 30}))
    assert (r.id, r.op) == ("r1", "prepare")
    assert r.args == DeviceArgs("2-1", 2, 3, "g1", 30.0)
    assert parse_request(req("inspect", {"bus": 1, "addr": 127})).args.bus == 1
    assert parse_request(req("release", {"domain": "g1"})).args.names_device() is False
    assert parse_request(line({"version": 1, "id": 7, "op": "ping", "args": {}})).id == 7


@pytest.mark.hostile
@pytest.mark.parametrize(("raw", "kind", "words"), [
    (b"", proto.BAD_REQUEST, "not a JSON request"),
    (b"\xff\xfe", proto.BAD_REQUEST, "not UTF-8"),
    (b"[1]", proto.BAD_REQUEST, "not a list"),
    (b'{"version": NaN, "id": 1, "op": "ping", "args": {}}', proto.BAD_REQUEST, "NaN"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"selector": "2-1", '
     b'"timeout": Infinity}}', proto.BAD_REQUEST, "Infinity"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"selector": "2-1", '
     b'"timeout": 1e400}}', proto.BAD_REQUEST, "out of range"),
    (b'{"version": 1, "id": 1, "id": 2, "op": "ping", "args": {}}', proto.BAD_REQUEST,
     "duplicate key 'id'"),
    (b'{"version": 1, "id": 1, "op": "ping", "op": "prepare", "args": {}}',
     proto.BAD_REQUEST, "duplicate"),
    (b'{"version": true, "id": 1, "op": "ping", "args": {}}', proto.BAD_REQUEST, "version"),
    (b'{"version": 1.0, "id": 1, "op": "ping", "args": {}}', proto.BAD_REQUEST, "version"),
    (b'{"version": 2, "id": 1, "op": "ping", "args": {}}', proto.UNSUPPORTED_VERSION,
     "speaks 1"),
    (b'{"version": 1, "id": 1, "op": "ping", "args": {}, "domain": "g1"}',
     proto.BAD_REQUEST, "unknown field 'domain'"),
    (b'{"version": 1, "id": 1, "op": "ping"}', proto.BAD_REQUEST, "missing field 'args'"),
    (b'{"version": 1, "id": true, "op": "ping", "args": {}}', proto.BAD_REQUEST, "'id'"),
    (b'{"version": 1, "id": 9007199254740993, "op": "ping", "args": {}}', proto.BAD_REQUEST,
     "'id'"),
    (b'{"version": 1, "id": "", "op": "ping", "args": {}}', proto.BAD_REQUEST, "'id'"),
    (b'{"version": 1, "id": 1, "op": "shell", "args": {}}', proto.BAD_REQUEST, "'op'"),
    (b'{"version": 1, "id": 1, "op": "ping", "args": {"x": 1}}', proto.BAD_REQUEST,
     "unknown argument 'x'"),
    (b'{"version": 1, "id": 1, "op": "ping", "args": []}', proto.BAD_REQUEST, "object"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"bus": 2}}', proto.BAD_REQUEST,
     "together"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"bus": true, "addr": 3}}',
     proto.BAD_REQUEST, "integer"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"bus": 2.0, "addr": 3}}',
     proto.BAD_REQUEST, "integer"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"bus": 0, "addr": 3}}',
     proto.BAD_REQUEST, "1 to 999"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"domain": "g1"}}',
     proto.BAD_REQUEST, "give 'selector'"),
    (b'{"version": 1, "id": 1, "op": "release", "args": {}}', proto.BAD_REQUEST,
     "release all"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"selector": "2-1", "domain": ""}}',
     proto.BAD_REQUEST, "1 to 4096"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"selector": "2-1", '
     b'"domain": "g\\u0000"}}', proto.BAD_REQUEST, "NUL"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"selector": "\\ud800"}}',
     proto.BAD_REQUEST, "surrogate"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"selector": "2-1", '
     b'"domain": null}}', proto.BAD_REQUEST, "string"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"selector": "2-1", '
     b'"timeout": 0}}', proto.BAD_REQUEST, "positive"),
    (b'{"version": 1, "id": 1, "op": "prepare", "args": {"selector": "2-1", '
     b'"timeout": "30"}}', proto.BAD_REQUEST, "number"),
    (b"[" * 100_000, proto.BAD_REQUEST, "not a JSON request"),
    (b'{"version": 1, "id": 1, "op": "ping", "args": {}} {}', proto.BAD_REQUEST,
     "Extra data"),
])
def test_hostile_requests_are_refused_with_the_reason(raw: bytes, kind: str,
                                                      words: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_request(raw)
    assert err.value.kind == kind
    assert words in err.value.message


def test_an_error_keeps_a_well_formed_id_and_only_that() -> None:
    with pytest.raises(ProtocolError) as err:
        parse_request(req("ping", {"x": 1}))
    assert err.value.request_id == "r1"
    with pytest.raises(ProtocolError) as err:
        parse_request(line({"version": 1, "id": [1], "op": "ping", "args": {}}))
    assert err.value.request_id is None


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(["version", "id", "op", "args", "selector", "bus", "addr", "domain",
                         "timeout", "x"])


@pytest.mark.hostile
@given(st.binary(max_size=300))
def test_any_bytes_are_a_request_or_a_protocol_error(raw: bytes) -> None:
    try:
        r = parse_request(raw)
    except ProtocolError as exc:
        assert exc.kind in proto.ERROR_KINDS and exc.message
        return
    assert r.op in proto.OPS


@pytest.mark.hostile
@given(st.dictionaries(_keys, _json, max_size=6),
       st.dictionaries(_keys, _json | st.integers(-5, 1500), max_size=6),
       st.sampled_from([*proto.OPS, "x"]))
def test_any_json_object_is_a_request_or_a_protocol_error(
        doc: dict[str, Any], args: dict[str, Any], op: str) -> None:
    doc = {"version": 1, "id": 1, "op": op, "args": args, **doc}
    try:
        r = parse_request(line(doc))
    except ProtocolError as exc:
        assert exc.kind in proto.ERROR_KINDS and exc.message
        return
    # What parsed is exactly what was sent, with nothing unknown let through.
    assert set(doc) == {"version", "id", "op", "args"} and doc["version"] == 1
    assert r.op == doc["op"] and r.id == doc["id"]
    assert r.args.as_json() == {k: float(v) if k == "timeout" else v
                                for k, v in doc["args"].items()}


@given(st.sampled_from(["inspect", "prepare"]),
       st.one_of(st.none(), st.text(min_size=1, max_size=30).filter(
           lambda s: "\0" not in s and not any("\ud800" <= c <= "\udfff" for c in s))),
       st.integers(1, 999), st.integers(1, 999),
       st.one_of(st.none(), st.text(min_size=1, max_size=30).filter(
           lambda s: "\0" not in s and not any("\ud800" <= c <= "\udfff" for c in s))))
def test_what_a_client_sends_the_daemon_reads_back(op: str, selector: str | None, bus: int,
                                                   addr: int, domain: str | None) -> None:
    args: dict[str, Any] = {"bus": bus, "addr": addr}
    if selector is not None:
        args["selector"] = selector
    if domain is not None and op == "prepare":
        args["domain"] = domain
    raw = proto.request_line(op, args, "id-1")
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    parsed = parse_request(raw[:-1])
    assert parsed.args.as_json() == args


def test_replies_parse_and_anything_else_is_refused() -> None:
    ok = parse_reply(proto.ok_reply("a", {"free": True})[:-1])
    assert ok.ok and ok.result == {"free": True} and ok.id == "a"
    err = parse_reply(proto.error_reply(3, proto.REFUSED, "mounted", {"ok": False})[:-1])
    assert (err.ok, err.error_kind, err.error_message, err.outcome) == (
        False, proto.REFUSED, "mounted", {"ok": False})
    for bad in (b'{"version": 1, "id": 1, "ok": true}',
                b'{"version": 1, "id": 1, "ok": false, "error": {"kind": "x"}}',
                b'{"version": 2, "id": 1, "ok": true, "result": 1}',
                b'{"version": 1, "id": 1, "ok": true, "result": 1, "result": 2}',
                b'{"version": 1, "id": 1, "ok": "yes", "result": 1}',
                b'{"version": 1, "id": 1, "ok": true, "result": NaN}'):
        with pytest.raises(ValueError):
            parse_reply(bad)
