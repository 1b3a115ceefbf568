"""Roots.quiet: sysfs readings kept only while the kernel's uevent count stands."""

from __future__ import annotations

from pathlib import Path

from safeusb.host.roots import QuietMemo, Roots


def _roots(tmp_path: Path, count: str | None) -> Roots:
    kernel = tmp_path / "sys" / "kernel"
    kernel.mkdir(parents=True, exist_ok=True)
    if count is not None:
        (kernel / "uevent_seqnum").write_text(count + "\n")
    return Roots(sys=str(tmp_path / "sys"))


def test_kept_while_no_uevent_comes(tmp_path: Path) -> None:
    roots, calls = _roots(tmp_path, "41"), []

    def read() -> list[int]:
        calls.append(1)
        return [len(calls)]

    first, kept = roots.read_quietly("k", read)
    assert (first, kept) == ([1], False)
    again, kept = roots.read_quietly("k", read)
    assert again is first and kept
    assert roots.read_quietly("other", read) == ([2], False)  # each key its own
    _roots(tmp_path, "42")  # a uevent: everything is read afresh
    assert roots.read_quietly("k", read) == ([3], False)
    assert roots.read_quietly("k", read) == ([3], True)
    assert roots.read_quietly("other", read) == ([4], False)


def test_a_reading_during_a_uevent_is_not_kept(tmp_path: Path) -> None:
    roots = _roots(tmp_path, "7")
    seen = []

    def read_while_a_device_comes() -> int:
        seen.append(1)
        if len(seen) == 1:
            _roots(tmp_path, "8")
        return len(seen)

    assert roots.read_quietly("k", read_while_a_device_comes) == (1, False)
    assert roots.read_quietly("k", read_while_a_device_comes) == (2, False)
    assert roots.read_quietly("k", read_while_a_device_comes) == (2, True)


def test_nothing_kept_without_the_count(tmp_path: Path) -> None:
    for count in (None, "not a number"):
        roots, calls = _roots(tmp_path / str(count), count), []
        for _ in range(2):
            assert roots.read_quietly("k", lambda c=calls: c.append(1)) == (None, False)
        assert len(calls) == 2


def test_each_roots_keeps_its_own(tmp_path: Path) -> None:
    a, b = _roots(tmp_path, "1"), _roots(tmp_path, "1")
    assert a.quiet is not b.quiet and isinstance(a.quiet, QuietMemo)
    a.read_quietly("k", lambda: 1)
    assert b.read_quietly("k", lambda: 2) == (2, False)
    assert a == b  # what the roots name, not what they keep
