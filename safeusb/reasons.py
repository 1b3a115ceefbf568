"""What keeps a device from being handed over (or is worth a warning): one ``Reason``,
its kind and its details, typed per kind.

The inspect decision and the per-class decisions (netinfo, inputdev, modeswitch) make
them; plan, status and report read them. ``Reason.as_json`` is the reason's object in
``safeusb inspect --json`` and in safeusbd's answers: {"kind", "text", then the details'
fields in the order declared here}; ``reason_from_json`` reads such an object back.
Imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

from safeusb.values import frozen


class ReasonKind(enum.StrEnum):
    MOUNT = "mount"
    SUBMOUNT = "submount"
    SWAP = "swap"
    HOLDER = "holder"
    OPEN = "open"
    EXCLUSIVE = "exclusive"
    DIRTY = "dirty"
    NETWORK = "network"
    LAST_INPUT = "last-input"
    UNREADABLE = "unreadable"
    MODE_SWITCH = "mode-switch"  # a warning, never a refusal


@frozen
class Details:
    """The details of one kind of reason. Each subclass names its KIND; its fields, in
    order, are the JSON fields after "kind" and "text"."""

    KIND: ClassVar[ReasonKind]

    def as_json(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


@frozen
class Mount(Details):
    KIND = ReasonKind.MOUNT
    device: str
    mountpoint: str
    fstype: str
    options: str
    mnt_ns: int
    pid: int
    comm: str


@frozen
class Submount(Details):
    """A foreign mount stacked on one of the device's filesystems."""

    KIND = ReasonKind.SUBMOUNT
    mountpoint: str
    fstype: str
    source: str
    below: str  # the mountpoint of the device's filesystem below it
    mnt_ns: int
    pid: int


@frozen
class Swap(Details):
    KIND = ReasonKind.SWAP
    filename: str
    used_bytes: int


@frozen
class Holder(Details):
    """A block device built on one of the device's (dm-crypt, LVM, md, bcache, ...)."""

    KIND = ReasonKind.HOLDER
    device: str
    holder: str
    holder_kind: str
    dm_name: str | None


@frozen
class LoopHolder(Details):
    """A loop device backed by a file on one of the device's filesystems."""

    KIND = ReasonKind.HOLDER
    holder: str
    backing_file: str | None

    def as_json(self) -> dict[str, Any]:
        return {"device": None, "holder": self.holder, "holder_kind": "loop",
                "backing_file": self.backing_file}


@frozen
class Use:
    how: str  # "fd", "cwd", "root", "exe", "mmap"
    path: str


@frozen
class Open(Details):
    """A process holds a node of the device open, or files on its filesystems (uses)."""

    KIND = ReasonKind.OPEN
    pid: int
    comm: str
    device: str
    uses: tuple[Use, ...]


@frozen
class Exclusive(Details):
    KIND = ReasonKind.EXCLUSIVE
    device: str


@frozen
class Dirty(Details):
    KIND = ReasonKind.DIRTY
    device: str
    dirty_bytes: int
    writeback_bytes: int


@frozen
class Network(Details):
    """Something the host does with one of the device's network interfaces; a subclass
    per cause. JSON: interface, netns, netns_where, cause, then the subclass's fields."""

    KIND = ReasonKind.NETWORK
    interface: str
    netns: int
    netns_where: str | None

    @property
    def cause(self) -> str:
        raise NotImplementedError

    def as_json(self) -> dict[str, Any]:
        doc = super().as_json()
        head = {k: doc.pop(k) for k in ("interface", "netns", "netns_where")}
        return {**head, "cause": self.cause, **doc}


@frozen
class NetworkRoute(Network):
    destination: str  # "default" or "10.0.0.0/8"
    gateway: str | None
    table: int

    @property
    def cause(self) -> str:
        return "default-route" if self.destination == "default" else "route"


@frozen
class NetworkAddress(Network):
    address: str

    @property
    def cause(self) -> str:
        return "address"


@frozen
class NetworkEnslaved(Network):
    master: str
    master_kind: str | None

    @property
    def cause(self) -> str:
        return "enslaved"


@frozen
class NetworkStacked(Network):
    """An interface of the host stacked on the device's (VLAN, macvlan, ...)."""

    lower: str
    link_kind: str | None

    @property
    def cause(self) -> str:
        return "stacked"


@frozen
class NetworkUp(Network):
    operstate: str
    rx_bytes: int | None
    tx_bytes: int | None

    @property
    def cause(self) -> str:
        return "up"


@frozen
class LastInput(Details):
    KIND = ReasonKind.LAST_INPUT
    input: str  # "keyboard" or "pointer"
    devices: tuple[str, ...]  # sysnames: "input5"
    names: tuple[str, ...]
    inhibited: tuple[str, ...]  # sysnames of the inhibited ones elsewhere


@frozen
class CannotRead(Details):
    """Something that could not be read: the device may be in use for all safeusb knows."""

    KIND = ReasonKind.UNREADABLE
    what: str
    error: str | None


@frozen
class ModeSwitch(Details):
    """A device that changes its vendor:product; a subclass per mode. JSON: vendor_id,
    product_id, mode, then the subclass's fields."""

    KIND = ReasonKind.MODE_SWITCH
    vendor_id: str  # "12d1"
    product_id: str

    @property
    def mode(self) -> str:
        raise NotImplementedError

    def as_json(self) -> dict[str, Any]:
        doc = super().as_json()
        head = {k: doc.pop(k) for k in ("vendor_id", "product_id")}
        return {**head, "mode": self.mode, **doc}


@frozen
class ModeSwitchStorage(ModeSwitch):
    """In its storage ("driver CD") mode, per the usb_modeswitch database."""

    switches_to: tuple[str, ...]  # "12d1:1506"
    database: tuple[str, ...]

    @property
    def mode(self) -> str:
        return "storage"


@frozen
class ModeSwitchSwitched(ModeSwitch):
    """Already switched: it comes back in storage mode after a reset."""

    storage_ids: tuple[str, ...]
    database: tuple[str, ...]

    @property
    def mode(self) -> str:
        return "switched"


@frozen
class ModeSwitchMaybe(ModeSwitch):
    """Only a CD-ROM drive, and no usb_modeswitch database to tell."""

    @property
    def mode(self) -> str:
        return "maybe-storage"

    def as_json(self) -> dict[str, Any]:
        return {**super().as_json(), "database": []}


@frozen
class Reason:
    """One thing that keeps the device from being handed over now (or, among warnings,
    one worth knowing). Its kind is its details' kind."""

    text: str
    details: Details

    @property
    def kind(self) -> ReasonKind:
        return self.details.KIND

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "text": self.text, **self.details.as_json()}


D = TypeVar("D", bound=Details)


def with_details(reasons: Iterable[Reason], cls: type[D]) -> list[tuple[Reason, D]]:
    """The reasons whose details are a ``cls``, each with its details so typed."""
    return [(r, r.details) for r in reasons if isinstance(r.details, cls)]


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Use):
        return {"how": value.how, "path": value.path}
    return value


# ---------------------------------------------------------------------------------------
# Reading a reason back from its JSON (safeusbd's inspect answer)

VARIANTS: tuple[type[Details], ...] = (
    Mount, Submount, Swap, Holder, LoopHolder, Open, Exclusive, Dirty, NetworkRoute,
    NetworkAddress, NetworkEnslaved, NetworkStacked, NetworkUp, LastInput, CannotRead,
    ModeSwitchStorage, ModeSwitchSwitched, ModeSwitchMaybe,
)


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if hint is Use:
        return (isinstance(value, dict) and set(value) == {"how", "path"}
                and all(isinstance(v, str) for v in value.values()))
    args = typing.get_args(hint)  # a union: str | None
    return bool(args) and any(_fits(value, a) for a in args)


def _typed(value: Any, hint: Any) -> Any:
    if typing.get_origin(hint) is tuple:
        return tuple(_typed(v, typing.get_args(hint)[0]) for v in value)
    if hint is Use:
        return Use(value["how"], value["path"])
    return value


def _details_from(cls: type[Details], doc: dict[str, Any]) -> Details | None:
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in doc or not _fits(doc[f.name], hints[f.name]):
            return None
        values[f.name] = _typed(doc[f.name], hints[f.name])
    details = cls(**values)
    return details if details.as_json() == doc else None


def reason_from_json(doc: Any) -> Reason:
    """The reason whose as_json is ``doc``; ValueError when no reason gives it."""
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise ValueError("not a reason")
    rest = {k: v for k, v in doc.items() if k not in ("kind", "text")}
    for cls in VARIANTS:
        if cls.KIND.value == doc.get("kind"):
            details = _details_from(cls, rest)
            if details is not None:
                return Reason(doc["text"], details)
    raise ValueError(f"not a {doc.get('kind')!r} reason that safeusb knows")
