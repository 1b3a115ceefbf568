"""@frozen against @dataclass(frozen=True): the same classes, declared both ways, compare,
hash and show alike, and refuse assignment alike."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest

from safeusb.values import frozen


def _declare(deco: Any) -> tuple[type, type, type]:
    @deco
    class Base:
        a: int
        b: tuple[str, ...] = ()
        note: str = field(default="", compare=False)
        secret: str = field(default="", repr=False)
        weight: float = field(default=0.0, hash=False)

    @deco
    class Sub(Base):
        c: str | None = None

    @deco
    class Empty:
        pass

    return Base, Sub, Empty


OURS = _declare(frozen)
THEIRS = _declare(dataclass(frozen=True))
ARGS: list[tuple[int, dict[str, Any]]] = [
    (0, {}), (1, {"a": 1}), (1, {"a": 2}), (1, {"a": 1, "b": ("x",)}),
    (1, {"a": 1, "note": "n"}), (1, {"a": 1, "secret": "s"}),
    (1, {"a": 1, "weight": 1.5}), (1, {"a": 1, "weight": float("nan")}),
    (2, {"a": 1, "c": "c"}), (2, {"a": 1}),
]


def _make(classes: tuple[type, type, type], which: int, kw: dict[str, Any]) -> Any:
    cls = classes[2 if which == 0 else which - 1]
    return cls() if which == 0 else cls(**kw)


def test_equality_hash_and_repr_are_the_dataclasses() -> None:
    for (w1, k1), (w2, k2) in itertools.product(ARGS, repeat=2):
        ours = (_make(OURS, w1, k1), _make(OURS, w2, k2))
        theirs = (_make(THEIRS, w1, k1), _make(THEIRS, w2, k2))
        assert (ours[0] == ours[1]) == (theirs[0] == theirs[1]), (k1, k2)
        assert (ours[0] != ours[1]) == (theirs[0] != theirs[1]), (k1, k2)
        assert ours[0].__eq__(1) is NotImplemented
    for which, kw in ARGS:
        ours, theirs = _make(OURS, which, kw), _make(THEIRS, which, kw)
        assert repr(ours) == repr(theirs)
        if kw.get("weight") == kw.get("weight"):  # not NaN: hash is of the same tuple
            assert hash(ours) == hash(theirs)
    nan = _make(OURS, 1, {"a": 1, "weight": float("nan")})
    assert nan == nan  # the same object: as a tuple of its fields compares


def test_frozen_replace_and_fields_as_dataclasses() -> None:
    base = OURS[0](1, ("x",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.a = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del base.a  # type: ignore[misc]
    assert dataclasses.replace(base, a=3) == OURS[0](3, ("x",))
    assert [f.name for f in dataclasses.fields(OURS[1])] == \
        [f.name for f in dataclasses.fields(THEIRS[1])]
    assert {base: 1}[OURS[0](1, ("x",), note="other")] == 1


def test_a_class_own_methods_are_kept() -> None:
    @frozen
    class Named:
        name: str

        def __repr__(self) -> str:
            return f"<{self.name}>"

    assert repr(Named("x")) == "<x>"
    assert Named("x") == Named("x")


def test_a_class_own_equality_keeps_the_dataclass_hash() -> None:
    """A body defining __eq__ leaves Python's implicit __hash__ = None; dataclass still
    hashes such a class on its fields, and so does @frozen."""
    def declare(deco: Any) -> type:
        @deco
        class Key:
            name: str

            def __eq__(self, other: object) -> bool:
                return isinstance(other, Key) and other.name.lower() == self.name.lower()

        return Key

    ours, theirs = declare(frozen), declare(dataclass(frozen=True))
    assert hash(ours("a")) == hash(theirs("a")) == hash(("a",))
    assert ours("a") == ours("A") and theirs("a") == theirs("A")

    @frozen
    class Unhashable:
        name: str
        __hash__ = None  # type: ignore[assignment]

    with pytest.raises(TypeError):
        hash(Unhashable("a"))


def test_the_constructor_is_the_dataclasses() -> None:
    """The __init__ compiled at the first instance takes what dataclass's takes, fills
    what it fills, calls __post_init__, and refuses what it refuses."""
    def declare(deco: Any) -> type:
        @deco
        class Many:
            a: int
            b: list[int] = field(default_factory=list)
            c: str = "c"
            d: int = field(default=4, init=False)
            e: list[str] = field(default_factory=lambda: ["e"], init=False)
            f: int = field(default=6, kw_only=True)
            g: int = field(kw_only=True, default_factory=lambda: 7)
            seen: list[str] = field(default_factory=list, compare=False)

            def __post_init__(self) -> None:
                self.seen.append(f"post {self.a}")

        return Many

    ours, theirs = declare(frozen), declare(dataclass(frozen=True))
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((1,), {}), ((1, [2]), {}), ((1, [2], "x"), {"f": 9}), ((), {"a": 1, "g": 0}),
        ((1, [2], "x", 4), {}), ((), {}), ((1,), {"d": 1}), ((1,), {"zz": 1}),
        ((1,), {"a": 2}), ((1,), {"f": 1, "g": 2, "c": "y", "b": []}),
    ]
    for args, kw in calls:
        try:
            expected: Any = theirs(*args, **kw)
        except (TypeError, AttributeError) as exc:
            with pytest.raises(type(exc)):
                ours(*args, **kw)
            continue
        got = ours(*args, **kw)
        assert dataclasses.asdict(got) == dataclasses.asdict(expected), (args, kw)
        assert repr(got).replace(ours.__qualname__, "X") == \
            repr(expected).replace(theirs.__qualname__, "X")
    one, two = ours(1), ours(1)
    assert one.b is not two.b and one.e is not two.e  # a factory per instance
    assert one.seen == ["post 1"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.d = 5
    with pytest.raises(TypeError):
        @frozen
        class WithInitVar:
            a: dataclasses.InitVar[int]
    for deco in (frozen, dataclass(frozen=True)):
        with pytest.raises(TypeError, match="non-default argument 'b' follows default"):
            @deco
            class Misordered:
                a: int = 0
                b: int  # type: ignore[misc]

        @deco
        class KeywordAfter:
            a: int = 0
            b: int = field(kw_only=True)

        assert KeywordAfter(b=1).b == 1
