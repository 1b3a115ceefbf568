"""QMP framing, strict parsing, replies and fd passing: examples and properties."""

from __future__ import annotations

import json
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeusb.gate.qmp import (
    ClientStream,
    Kind,
    LineStream,
    QMPParseError,
    error_reply,
    parse_message,
    recv_with_fds,
    send_with_fds,
)


def values(segs):  # type: ignore[no-untyped-def]
    return [s.raw for s in segs if s.kind is Kind.VALUE]


def test_several_messages_in_one_read_and_one_split_across_reads() -> None:
    s = ClientStream()
    a = b'{"execute":"a","id":1}\r\n{"execute":"b","arguments":{"x":"}{"}}\r\n{"exe'
    segs = s.feed(a)
    assert values(segs) == [b'{"execute":"a","id":1}', b'{"execute":"b","arguments":{"x":"}{"}}']
    assert b"".join(x.raw for x in segs) + b'{"exe' == a
    assert values(s.feed(b'cute":"c"}')) == [b'{"execute":"c"}']


def test_strings_hide_brackets_quotes_and_escapes_across_reads() -> None:
    s = ClientStream()
    msg = b'{"a":"\\"}\\\\","b":\'}"\'}'
    out = []
    for i in range(len(msg)):
        out += s.feed(msg[i:i + 1])
    assert values(out) == [msg]


def test_junk_and_scalars_are_their_own_segments() -> None:
    segs = ClientStream().feed(b'42 "x{" }{"a":1} nul')
    kinds = [(x.kind, x.raw) for x in segs]
    assert (Kind.JUNK, b"42") in kinds and (Kind.JUNK, b'"x{"') in kinds
    assert (Kind.JUNK, b"}") in kinds and (Kind.VALUE, b'{"a":1}') in kinds


def test_oversize_value_keeps_no_bytes_and_resynchronises() -> None:
    s = ClientStream(max_bytes=10)
    segs = s.feed(b'{"a":"0123456789abc"} {"b":1}')
    assert [x.kind for x in segs if x.kind is not Kind.SPACE] == [Kind.OVERSIZE, Kind.VALUE]
    assert segs[0].raw == b""


def test_fds_go_to_first_value_starting_in_their_read() -> None:
    s = ClientStream()
    segs = s.feed(b'{"execute":"a"', [])
    segs += s.feed(b'}\r\n{"execute":"getfd"}\r\n', [7])
    got = {x.raw: x.fds for x in segs if x.kind is Kind.VALUE}
    assert got == {b'{"execute":"a"}': (), b'{"execute":"getfd"}': (7,)}


def test_fds_in_middle_of_value_go_to_it_and_fds_alone_wait_for_next() -> None:
    s = ClientStream()
    segs = s.feed(b'{"execute":')
    segs += s.feed(b'"x"', [3])
    segs += s.feed(b"}\r\n")
    segs += s.feed(b"\r\n", [4])
    segs += s.feed(b'{"execute":"y"}')
    assert [x.fds for x in segs if x.kind is Kind.VALUE] == [(3,), (4,)]


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.floats(
    allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
spaces = st.text(alphabet=" \t\r\n", max_size=3)


@settings(max_examples=300)
@given(st.lists(st.tuples(objects, spaces, st.booleans()), min_size=1, max_size=8), st.data())
def test_any_split_of_a_stream_gives_the_same_values_and_loses_no_byte(msgs, data) -> None:  # type: ignore[no-untyped-def]
    encoded = [(json.dumps(o, ensure_ascii=a).encode(), ws.encode()) for o, ws, a in msgs]
    stream = b"".join(m + w for m, w in encoded)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    s = ClientStream()
    segs = []
    prev = 0
    for c in [*cuts, len(stream)]:
        segs += s.feed(stream[prev:c])
        prev = c
    assert values(segs) == [m for m, _w in encoded]
    assert b"".join(x.raw for x in segs) == stream
    assert [json.loads(v) for v in values(segs)] == [o for o, _w, _a in msgs]


@given(st.lists(objects, min_size=1, max_size=6), st.data())
def test_fds_sent_with_a_command_arrive_with_it_under_any_later_split(msgs, data) -> None:  # type: ignore[no-untyped-def]
    # A sender writes each command in one write, fds with its first byte; the kernel may
    # deliver a write in several reads, and join a write to the tail of the one before.
    s = ClientStream()
    expected, segs = [], []
    carry = b""
    for n, o in enumerate(msgs):
        raw = json.dumps(o).encode() + b"\r\n"
        fds = (n,) if data.draw(st.booleans()) else ()
        expected.append(fds)
        cut = data.draw(st.integers(0, len(carry)))
        if carry[:cut]:
            segs += s.feed(carry[:cut])
        first = data.draw(st.integers(1, len(raw)))
        segs += s.feed(carry[cut:] + raw[:first], fds)
        carry = raw[first:]
    segs += s.feed(carry)
    assert [x.fds for x in segs if x.kind is Kind.VALUE] == expected


@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"") + b"\r\n"),
                max_size=8), st.data())
def test_lines_come_back_whole_under_any_split(lines, data) -> None:  # type: ignore[no-untyped-def]
    stream = b"".join(lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    ls, got, prev = LineStream(), [], 0
    for c in [*cuts, len(stream)]:
        got += ls.feed(stream[prev:c])
        prev = c
    assert got == lines and ls.pending == b""


@pytest.mark.parametrize("bad", [
    b'{"a":1,"a":2}', b"{'execute':'x'}", b'{"a":NaN}', b'{"a":Infinity}', b'{"a":"\xff"}',
    b'{"a":"\x01"}', b'{"a":"\\q"}', b"[" * 100000 + b"]" * 100000,
])
def test_strict_parse_rejects_what_qemu_might_read_differently(bad: bytes) -> None:
    with pytest.raises(QMPParseError):
        parse_message(bad)


@pytest.mark.parametrize("ident", [1, "x", None, [1, {"a": 2}], {"k": "v"}, 1.5, True])
def test_error_reply_echoes_any_id(ident: object) -> None:
    reply = json.loads(error_reply("safeusb: no", {"execute": "device_add", "id": ident}))
    assert reply == {"error": {"class": "GenericError", "desc": "safeusb: no"}, "id": ident}


def test_error_reply_without_id_has_none() -> None:
    assert "id" not in json.loads(error_reply("x", {"execute": "device_add"}))


def test_fds_pass_through_a_socket_pair() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        send_with_fds(a, b'{"execute":"getfd"}', [r])
        data, fds = recv_with_fds(b)
        assert data == b'{"execute":"getfd"}' and len(fds) == 1
        os.write(w, b"!")
        assert os.read(fds[0], 1) == b"!"
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
