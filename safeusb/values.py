"""Frozen value classes: dataclasses whose equality, hash, repr, assignment and deletion
are functions shared by all of them, and whose ``__init__`` is compiled when the class is
first instantiated, rather than code generated and compiled for each class when its
module is imported (what a frozen dataclass costs to define is mostly those five
compilations, and `safeusb inspect` defines over fifty classes before it reads anything,
and builds few of them). They behave as ``@dataclass(frozen=True)``: the same
constructor, equal when of the same class with equal compared fields, hashed on those
fields, shown as ``Name(field=value, ...)``, and any assignment refused."""

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


def _setattr(self: Any, name: str, value: Any) -> None:
    # as a frozen dataclass's: a subclass that is not one of these may add attributes
    if "__values_frozen__" in type(self).__dict__ or name in self.__values_fields__:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
    object.__setattr__(self, name, value)


def _delattr(self: Any, name: str) -> None:
    if "__values_frozen__" in type(self).__dict__ or name in self.__values_fields__:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
    object.__delattr__(self, name)


_FACTORY = object()  # a field's default where it has a default_factory


def _init(cls: type) -> Any:
    """The ``__init__`` that ``@dataclass(frozen=True)`` gives ``cls``: its fields as
    parameters in order (keyword-only ones after ``*``), defaults and default factories,
    fields not in ``__init__`` set from theirs, then ``__post_init__``."""
    ns: dict[str, Any] = {"_set": object.__setattr__, "_FACTORY": _FACTORY}
    params: list[str] = []
    kwonly: list[str] = []
    body: list[str] = []
    for f in dataclasses.fields(cls):
        name = f.name
        if f.default is not dataclasses.MISSING:
            ns[f"_d_{name}"] = f.default
            default, value = f"=_d_{name}", f"_d_{name}"
        elif f.default_factory is not dataclasses.MISSING:
            ns[f"_f_{name}"] = f.default_factory
            default, value = "=_FACTORY", f"_f_{name}()"
        else:
            default = value = ""
        if f.init:
            (kwonly if f.kw_only is True else params).append(name + default)
            if default == "=_FACTORY":
                value = f"_f_{name}() if {name} is _FACTORY else {name}"
            else:
                value = name
        elif not value:
            continue  # neither in __init__ nor with a default: left unset, as dataclass does
        body.append(f"_set(_values_self, {name!r}, {value})")
    if hasattr(cls, "__post_init__"):
        body.append("_values_self.__post_init__()")
    signature = ", ".join(["_values_self", *params, *(["*", *kwonly] if kwonly else [])])
    source = f"def __init__({signature}):\n" + "".join(f"    {b}\n" for b in body or ["pass"])
    exec(source, ns)  # noqa: S102 - built from the class's own field names, as dataclasses does
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


def _lazy_init(cls: type) -> Any:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        real = _init(cls)
        type.__setattr__(cls, "__init__", real)
        real(self, *args, **kwargs)

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def frozen(cls: type[T]) -> type[T]:
    """``@dataclass(frozen=True)``, with the shared equality, hash, repr, assignment and
    deletion, and an ``__init__`` compiled at the first instance."""
    if not cls.__doc__:
        # dataclass would make one of the class's signature, which inspect builds from
        # object.__init__'s text signature: the most that defining a class costs here.
        cls.__doc__ = cls.__name__
    cls = dataclasses.dataclass(init=False, eq=False, repr=False)(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    pseudo = [f for f in cls.__dataclass_fields__.values()  # type: ignore[attr-defined]
              if f not in fields]
    if any("InitVar" in str(f.type) for f in pseudo):  # ClassVar are the others
        raise TypeError(f"{cls.__qualname__}: InitVar fields are not supported by @frozen")
    defaulted = ""
    for f in fields:  # what dataclass refuses when it compiles __init__, refused here too
        if not f.init or f.kw_only is True:
            continue
        if f.default is not dataclasses.MISSING \
                or f.default_factory is not dataclasses.MISSING:
            defaulted = f.name
        elif defaulted:
            raise TypeError(f"non-default argument {f.name!r} follows default argument")
    attrs: dict[str, Any] = {
        "__values_frozen__": True,
        "__values_fields__": frozenset(f.name for f in fields),
        "__setattr__": _setattr,
        "__delattr__": _delattr,
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
    if "__init__" not in own:
        type.__setattr__(cls, "__init__", _lazy_init(cls))
    return cls
