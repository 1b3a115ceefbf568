"""QEMU's command line as libvirt writes it: the QMP monitor's chardev, the domain name.

libvirt 9 gives the monitor as a listening socket it created and passes in:
`-chardev socket,id=charmonitor,fd=N,server=on,wait=off` with
`-mon chardev=charmonitor,id=monitor,mode=control`; older versions give `path=` instead
of `fd=`, newer ones may write `-chardev` as JSON (a ChardevBackend). The gate swaps the
socket for one of its own and keeps every other argument as it is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from safeusb.errors import SafeUSBError
from safeusb.gate.qemu_usb_host import split_qemu_opts
from safeusb.values import frozen


class MonitorArgsError(SafeUSBError):
    """A monitor the gate cannot put itself in front of."""


@frozen
class MonitorSocket:
    """Where the monitor chardev listens: an inherited fd or a path."""

    index: int  # position of the -chardev value in the argument list
    chardev_id: str
    fd: int | None
    path: str | None


def _join_opts(items: Sequence[str]) -> str:
    return ",".join(i.replace(",", ",,") for i in items)


def _opts_dict(text: str) -> tuple[list[str], dict[str, str]]:
    items = split_qemu_opts(text)
    props: dict[str, str] = {}
    for item in items[1:]:
        key, _sep, value = item.partition("=")
        props[key] = value
    return items, props


def _bool_on(value: str | None) -> bool:
    return value in ("", "on", "yes", "true", "y")


def _control_monitors(args: Sequence[str]) -> list[str]:
    ids = []
    for i, arg in enumerate(args[:-1]):
        if arg in ("-mon", "--mon"):
            props: dict[str, str] = {}
            for item in split_qemu_opts(args[i + 1]):
                key, _sep, value = item.partition("=")
                props[key] = value
            if props.get("mode") == "control" and "chardev" in props:
                ids.append(props["chardev"])
    return ids


def _chardev_json(text: str) -> dict[str, Any] | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise MonitorArgsError(f"-chardev {text!r}: not JSON: {exc}") from None
    return obj if isinstance(obj, dict) else None


def find_monitor(args: Sequence[str]) -> MonitorSocket | None:
    """The QMP monitor's socket, or None when the command line has no QMP monitor
    given with -mon (libvirt probing capabilities uses -qmp, and is not a domain)."""
    ids = _control_monitors(args)
    if not ids:
        return None
    if len(ids) > 1:
        raise MonitorArgsError(f"{len(ids)} QMP monitors ({', '.join(ids)}); the gate guards one")
    want = ids[0]
    for i, arg in enumerate(args[:-1]):
        if arg not in ("-chardev", "--chardev"):
            continue
        text = args[i + 1]
        obj = _chardev_json(text)
        if obj is not None:
            if obj.get("id") != want:
                continue
            return _from_json(i + 1, want, obj)
        items, props = _opts_dict(text)
        if props.get("id") != want:
            continue
        if items[0] != "socket":
            raise MonitorArgsError(f"monitor chardev {want!r} is {items[0]!r}, not a socket")
        if not _bool_on(props.get("server")):
            raise MonitorArgsError(f"monitor chardev {want!r} is not a listening socket")
        if "fd" in props:
            try:
                fd = int(props["fd"])
            except ValueError:
                raise MonitorArgsError(f"monitor chardev fd={props['fd']!r}") from None
            return MonitorSocket(i + 1, want, fd, None)
        if props.get("path"):
            return MonitorSocket(i + 1, want, None, props["path"])
        raise MonitorArgsError(f"monitor chardev {want!r} is neither fd= nor path=")
    raise MonitorArgsError(f"no -chardev for the monitor {want!r}")


def _from_json(index: int, want: str, obj: dict[str, Any]) -> MonitorSocket:
    backend = obj.get("backend")
    data = backend.get("data") if isinstance(backend, dict) else None
    if not isinstance(backend, dict) or backend.get("type") != "socket" or not isinstance(
        data, dict
    ):
        raise MonitorArgsError(f"monitor chardev {want!r} is not a socket")
    if data.get("server") is not True:
        raise MonitorArgsError(f"monitor chardev {want!r} is not a listening socket")
    addr = data.get("addr")
    adata = addr.get("data") if isinstance(addr, dict) else None
    if not isinstance(addr, dict) or not isinstance(adata, dict):
        raise MonitorArgsError(f"monitor chardev {want!r} has no address")
    if addr.get("type") == "fd" and isinstance(adata.get("str"), str):
        try:
            return MonitorSocket(index, want, int(adata["str"]), None)
        except ValueError:
            raise MonitorArgsError(f"monitor chardev fd {adata['str']!r}") from None
    if addr.get("type") == "unix" and isinstance(adata.get("path"), str):
        return MonitorSocket(index, want, None, adata["path"])
    raise MonitorArgsError(f"monitor chardev {want!r}: address type {addr.get('type')!r}")


def with_monitor_fd(args: Sequence[str], mon: MonitorSocket, fd: int) -> list[str]:
    """The same arguments, the monitor chardev now listening on fd (server, no wait)."""
    out = list(args)
    text = args[mon.index]
    obj = _chardev_json(text)
    if obj is not None:
        obj["backend"]["data"]["addr"] = {"type": "fd", "data": {"str": str(fd)}}
        out[mon.index] = json.dumps(obj, separators=(",", ":"))
        return out
    items = split_qemu_opts(text)
    kept = [items[0]] + [
        i for i in items[1:] if i.partition("=")[0] not in ("fd", "path", "abstract", "tight")
    ]
    kept.append(f"fd={fd}")
    out[mon.index] = _join_opts(kept)
    return out


def domain_name(args: Sequence[str]) -> str | None:
    """The domain's name from `-name guest=NAME,...` (or `-name NAME`)."""
    for i, arg in enumerate(args[:-1]):
        if arg in ("-name", "--name"):
            items = split_qemu_opts(args[i + 1])
            for n, item in enumerate(items):
                key, sep, value = item.partition("=")
                if sep and key == "guest":
                    return value
                if not sep and n == 0:
                    return item
    return None
