"""Frozen value classes: dataclasses whose equality, hash and repr are three functions
shared by all of them, rather than code generated and compiled for each class when its
module is imported (about half of what a frozen dataclass costs to define, and `safeusb
inspect` defines over fifty before it reads anything). They behave as
``@dataclass(frozen=True)``: equal when of the same class with equal compared fields,
hashed on those fields, shown as ``Name(field=value, ...)``."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, dataclass_transform

T = TypeVar("T")


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    names = self.__values_compared__
    return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)


def _hash(self: Any) -> int:
    return hash(tuple(getattr(self, n) for n in self.__values_hashed__))


def _repr(self: Any) -> str:
    shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__values_shown__)
    return f"{self.__class__.__qualname__}({shown})"


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def frozen(cls: type[T]) -> type[T]:
    """``@dataclass(frozen=True)``, with the shared equality, hash and repr."""
    cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    attrs: dict[str, Any] = {
        "__values_compared__": tuple(f.name for f in fields if f.compare),
        "__values_hashed__": tuple(
            f.name for f in fields if (f.compare if f.hash is None else f.hash)),
        "__values_shown__": tuple(f.name for f in fields if f.repr),
        "__eq__": _eq,
        "__hash__": _hash,
        "__repr__": _repr,
    }
    own = set(cls.__dict__)
    if cls.__dict__.get("__hash__", 0) is None and "__eq__" in own:
        # A class body that defines __eq__ gets __hash__ = None from Python itself: as
        # dataclass does, that is not a hash of its own, and the fields' hash is set.
        own.discard("__hash__")
    for name, value in attrs.items():
        if name not in own:
            setattr(cls, name, value)
    return cls
