"""Everything beyond storage: network interfaces, input devices, mode switching, and the
names of character device nodes (serial ports, modems, cameras, sound, HID)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from safeusb.host.model import ClassSnapshot, MountNamespace, Node, Target
from safeusb.host.roots import Roots

if TYPE_CHECKING:  # each class's module is imported where it is used: start-up stays short
    from safeusb.host.netinfo import NetMatch
    from safeusb.reasons import Reason


def read_classes(
    roots: Roots,
    target: Target,
    pids: Iterable[int],
    namespaces: Iterable[MountNamespace],
    net_match: NetMatch | None = None,
    net_dirs: Sequence[str] | None = None,
) -> ClassSnapshot:
    """Read, once, what the per-class decisions need. ``net_match`` replaces the
    device-to-interface mapping (tests name veth pairs with it); ``net_dirs`` are the
    device's "net" directories when a walk of it found them already."""
    from safeusb.host.inputdev import read_inputs  # noqa: PLC0415
    from safeusb.host.modeswitch import switch_db  # noqa: PLC0415
    from safeusb.host.netinfo import device_match, read_network  # noqa: PLC0415

    if net_match is None:
        net_match = device_match(target.syspath, target.usb.sysname if target.usb else None,
                                 net_dirs)
    net = read_network(roots, pids, namespaces, net_match)
    inputs = read_inputs(roots, target.syspath)
    db = switch_db(roots) if target.usb is not None and roots.live else None
    return ClassSnapshot(net, inputs, db)


def class_reasons(classes: ClassSnapshot) -> list[Reason]:
    from safeusb.host.inputdev import input_reasons  # noqa: PLC0415
    from safeusb.host.netinfo import net_reasons  # noqa: PLC0415

    return [*net_reasons(classes.net), *input_reasons(classes.inputs)]


def class_warnings(classes: ClassSnapshot, target: Target, nodes: tuple[Node, ...]) -> list[Reason]:
    if target.usb is None:
        return []
    from safeusb.host.modeswitch import modeswitch_warnings  # noqa: PLC0415

    return modeswitch_warnings(target.usb, nodes, classes.switch_db)


_PREFIXES = (
    ("ttyUSB", "the serial port"),
    ("ttyACM", "the modem"),
    ("cdc-wdm", "the modem control port"),
    ("video", "the camera"),
    ("v4l-subdev", "the camera"),
    ("media", "the camera"),
    ("snd/pcmC", "the sound device"),
    ("snd/controlC", "the sound card"),
    ("snd/midiC", "the MIDI port"),
    ("snd/", "the sound card"),
    ("hidraw", "the HID device"),
    ("usb/hiddev", "the HID device"),
    ("input/event", "the input device"),
    ("input/mouse", "the mouse"),
    ("input/js", "the joystick"),
    ("lp", "the printer"),
    ("usb/lp", "the printer"),
)


def node_label(node: Node) -> str:
    """How a reason names a node: "the camera /dev/video0"."""
    if node.kind == "char":
        for prefix, what in _PREFIXES:
            if node.devname.startswith(prefix):
                return f"{what} {node.path}"
    return node.path


def class_json(classes: ClassSnapshot | None) -> dict[str, Any]:
    """The JSON fields for these classes (added to schema version 1)."""
    if classes is None:
        return {"network_interfaces": [], "input_devices": []}
    net = classes.net
    return {
        "network_interfaces": [
            {
                "name": i.name,
                "netns": i.netns,
                "netns_where": net.where(i.netns),
                "ifindex": i.link.ifindex,
                "kind": i.kind,
                "address": i.link.address,
                "perm_address": i.link.perm_address,
                "up": i.up,
                "operstate": i.operstate,
                "master": i.master,
                "master_kind": i.master_kind,
                "lower": i.lower,
                "uppers": list(i.uppers),
                "addresses": [str(a) for a in i.addresses],
                "routes": [
                    {"destination": r.dst, "gateway": r.gateway, "table": r.table,
                     "family": r.family}
                    for r in i.routes
                ],
                "rx_bytes": i.rx_bytes,
                "tx_bytes": i.tx_bytes,
            }
            for i in net.interfaces
        ],
        "input_devices": [
            {"sysname": d.sysname, "name": d.name, "keyboard": d.keyboard,
             "pointer": d.pointer}
            for d in classes.inputs.devices
            if d.on_target
        ],
    }
