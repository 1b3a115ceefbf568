"""Roots.memo: a parse handed out again only while its text is the same."""

from __future__ import annotations

from safeusb.host.parsers import parse_mountinfo
from safeusb.host.roots import ParseMemo, Roots

LINE = "36 35 98:0 /mnt1 /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"


def test_the_same_text_is_not_parsed_again() -> None:
    memo, calls = ParseMemo(), []

    def parse(text: str) -> tuple[str, ...]:
        calls.append(text)
        return tuple(text.split())

    first = memo.parse("a", "x y", parse)
    assert memo.parse("a", "x y", parse) is first
    assert calls == ["x y"]
    assert memo.parse("a", "x z", parse) == ("x", "z")  # the text changed: parsed anew
    assert memo.parse("b", "x z", parse) == ("x", "z")  # another key: its own parse
    assert calls == ["x y", "x z", "x z"]


def test_keep_forgets_the_other_keys() -> None:
    memo, calls = ParseMemo(), []

    def parse(text: str) -> str:
        calls.append(text)
        return text

    memo.parse("a", "1", parse)
    memo.parse("b", "2", parse)
    memo.keep(["b"])
    memo.parse("a", "1", parse)
    memo.parse("b", "2", parse)
    assert calls == ["1", "2", "1"]


def test_a_failed_parse_is_not_kept() -> None:
    memo = ParseMemo()
    try:
        memo.parse("ns", "garbage\n", parse_mountinfo)
    except ValueError:
        pass
    else:
        raise AssertionError("garbage parsed")
    assert memo.parse("ns", LINE, parse_mountinfo)[0].mountpoint == "/mnt1"


def test_roots_compare_without_their_memo() -> None:
    a, b = Roots.host(), Roots.host()
    a.memo.parse("k", "t", str.upper)
    assert a == b and a.memo is not b.memo
