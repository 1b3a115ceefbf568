"""Classes beyond storage over built sysfs/procfs trees and built netlink messages:
serial ports and cameras held open, last keyboard and pointer, mode switching, network
decisions."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import tarfile
from pathlib import Path
from typing import Any

import pytest

from safeusb.handover.plan import build_plan
from safeusb.handover.policy import Settings
from safeusb.handover.steps import DownLink, Handoff
from safeusb.host.inputdev import input_reasons, parse_bitmap
from safeusb.host.model import (
    ClassSnapshot,
    InputDevice,
    InputScan,
    LinkId,
    NetAddress,
    NetInterface,
    NetNamespaceRef,
    NetRoute,
    NetScan,
    SwitchDb,
)
from safeusb.host.modeswitch import SwitchDbCache, parse_config, read_switch_db
from safeusb.host.netinfo import addresses_from, device_match, net_reasons, routes_from
from safeusb.host.selector import Selector, resolve
from safeusb.host.snapshot import read_snapshot
from safeusb.inspect.decide import Findings, inspect
from safeusb.inspect.report import as_json, as_text
from tests.unit.fakesys import LINUX_NS, PCI, ROOT_MOUNT, FakeSystem, _link, _write

# Capability bitmaps as a 64-bit kernel prints them for real devices.
KEYBOARD = {"ev": "120013", "key": "1000000000007 ff9f207ac14057ff febeffdfffefffff "
            "fffffffffffffffe"}
MOUSE = {"ev": "17", "key": "1f0000 0 0 0 0", "rel": "903"}
TOUCHSCREEN = {"ev": "b", "key": "400 0 0 0 0 0", "abs": "3"}
POWER_BUTTON = {"ev": "3", "key": "10000000000000 0"}


def _findings(fs: FakeSystem, selector: str = "2-1") -> Findings:
    return inspect(read_snapshot(fs.roots, resolve(Selector.from_string(selector), fs.roots)))


def _char_node(fs: FakeSystem, parent: Path, subsystem: str, devname: str,
               major: int, minor: int) -> Path:
    path = parent / os.path.basename(devname)
    fs._node(path, subsystem, devname, major, minor, "char", "")
    return path


def _hold(fs: FakeSystem, pid: int, comm: str, fd: int, target: str) -> None:
    """A process whose descriptor fd refers to a real file (the scan stats it)."""
    fs.process(pid, comm, LINUX_NS, ROOT_MOUNT)
    (fs.root / "proc" / str(pid) / "fd" / str(fd)).symlink_to(target)


@pytest.fixture
def gadget(tmp_path: Path) -> FakeSystem:
    """A composite device: a serial port and a camera; neither storage nor network."""
    fs = FakeSystem(tmp_path)
    usb = fs.usb_device("2-1", 0x1234, 0x5678, busnum=2, devnum=3, iface_class=0xFF)
    iface = usb / "2-1:1.0"
    # Device numbers of /dev/null and /dev/zero, so that descriptors pointing at those
    # real nodes stat as these.
    _char_node(fs, iface / "ttyUSB0" / "tty", "tty", "ttyUSB0", 1, 3)
    _char_node(fs, iface / "video4linux", "video4linux", "video0", 1, 5)
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    return fs


def test_idle_gadget_is_free(gadget: FakeSystem) -> None:
    f = _findings(gadget)
    assert f.free, as_text(f)
    assert {n.path for n in f.snapshot.nodes} >= {"/dev/ttyUSB0", "/dev/video0"}


def test_serial_port_and_camera_held_open(gadget: FakeSystem) -> None:
    _hold(gadget, 812, "cheese", 5, "/dev/zero")
    _hold(gadget, 900, "minicom", 3, "/dev/null")
    _hold(gadget, 901, "cat", 0, "/dev/full")  # a character device not on the gadget
    f = _findings(gadget)
    texts = [r.text for r in f.reasons]
    assert texts == ["pid 812 (cheese) has the camera /dev/video0 open",
                     "pid 900 (minicom) has the serial port /dev/ttyUSB0 open"]
    opens = [r for r in as_json(f)["reasons"] if r["kind"] == "open"]
    assert [(o["pid"], o["device"]) for o in opens] == [(812, "/dev/video0"),
                                                        (900, "/dev/ttyUSB0")]


# ---------------------------------------------------------------------------------------
# Input


def _input(fs: FakeSystem, parent: Path, sysname: str, name: str, caps: dict[str, str]) -> None:
    path = parent / "input" / sysname
    _write(path / "name", name + "\n")
    for cap in ("ev", "key", "rel", "abs"):
        _write(path / "capabilities" / cap, caps.get(cap, "0") + "\n")
    _link(fs.sys / "class/input" / sysname, path)


@pytest.fixture
def keyboard(tmp_path: Path) -> FakeSystem:
    fs = FakeSystem(tmp_path)
    usb = fs.usb_device("2-1", 0x0627, 0x0001, busnum=2, devnum=3, iface_class=3)
    hid = usb / "2-1:1.0" / "0003:0627:0001.0001"
    _input(fs, hid, "input5", "QEMU QEMU USB Keyboard", KEYBOARD)
    _input(fs, fs.sys / "devices/LNXSYSTM:00/LNXPWRBN:00", "input0", "Power Button",
           POWER_BUTTON)
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    return fs


def test_bitmaps() -> None:
    assert parse_bitmap("120013") == 0x120013
    assert parse_bitmap("1 0") == 1 << 64
    assert parse_bitmap("1 0", word_bits=32) == 1 << 32
    assert parse_bitmap("\n") == 0


def test_last_keyboard_refused_until_another_exists(keyboard: FakeSystem) -> None:
    f = _findings(keyboard)
    (r,) = f.reasons
    assert r.kind == "last-input"
    assert r.text == "it provides the host's last keyboard: input5 (QEMU QEMU USB Keyboard)"
    assert as_json(f)["input_devices"] == [
        {"sysname": "input5", "name": "QEMU QEMU USB Keyboard", "keyboard": True,
         "pointer": False}]
    _input(keyboard, keyboard.sys / "devices/platform/i8042/serio0", "input1",
           "AT Translated Set 2 keyboard", KEYBOARD)
    assert _findings(keyboard).free


def test_inhibited_keyboard_is_not_another(keyboard: FakeSystem) -> None:
    """An inhibited input device delivers no events: it is no keyboard to fall back on."""
    ps2 = keyboard.sys / "devices/platform/i8042/serio0"
    _input(keyboard, ps2, "input1", "AT Translated Set 2 keyboard", KEYBOARD)
    inhibited = ps2 / "input" / "input1" / "inhibited"
    _write(inhibited, "0\n")
    assert _findings(keyboard).free
    _write(inhibited, "1\n")
    (r,) = _findings(keyboard).reasons
    assert r.kind == "last-input"
    assert r.text == ("it provides the host's last keyboard: input5 (QEMU QEMU USB Keyboard); "
                      "input1 (AT Translated Set 2 keyboard) is inhibited")
    assert r.details.inhibited == ("input1",)


def test_last_pointer_relative_and_absolute(tmp_path: Path) -> None:
    fs = FakeSystem(tmp_path)
    usb = fs.usb_device("2-1", 0x0627, 0x0001, busnum=2, devnum=3, iface_class=3)
    _input(fs, usb / "2-1:1.0" / "0003:0627:0001.0002", "input6", "QEMU USB Mouse", MOUSE)
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    (r,) = _findings(fs).reasons
    assert (r.kind, r.details.input) == ("last-input", "pointer")
    assert r.text == "it provides the host's last pointing device: input6 (QEMU USB Mouse)"
    _input(fs, fs.sys / "devices/virtual", "input7", "touchscreen", TOUCHSCREEN)
    assert _findings(fs).free


def test_unreadable_other_input_fails_closed() -> None:
    from safeusb.host.model import Unreadable  # noqa: PLC0415

    scan = InputScan((InputDevice("input5", "kbd", True, False, True),),
                     (Unreadable("capabilities of input device input9", "I/O error"),))
    (r,) = input_reasons(scan)
    assert r.kind == "unreadable" and "another" in r.text


# ---------------------------------------------------------------------------------------
# Mode switching


def _switch_tree(root: Path) -> None:
    data = b'TargetVendor=0x12d1\nTargetProductList="1001,1406"\nHuaweiNewMode=1\n'
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("12d1:1446")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    _write(root / "usr/share/usb_modeswitch/placeholder", "")
    (root / "usr/share/usb_modeswitch/configPack.tar.gz").write_bytes(buf.getvalue())
    _write(root / "lib/udev/rules.d/40-usb_modeswitch.rules",
           '# HP\nATTR{idVendor}=="03f0", ATTR{idProduct}=="002a", RUN+="usb_modeswitch \'/%k\'"\n'
           'ATTRS{idVendor}=="19d2", ATTRS{manufacturer}!="Android", '
           'ATTR{bInterfaceClass}=="08", RUN+="usb_modeswitch \'%b/%k\'"\n')


def test_switch_db_parsing(tmp_path: Path) -> None:
    _switch_tree(tmp_path)
    db = read_switch_db(str(tmp_path))
    assert db is not None
    assert db.switches_to[(0x12D1, 0x1446)] == ((0x12D1, 0x1001), (0x12D1, 0x1406))
    assert db.switches_to[(0x03F0, 0x002A)] == ()
    assert db.storage_vendors == frozenset({0x19D2})
    assert read_switch_db(str(tmp_path / "nothing")) is None
    assert parse_config("TargetProduct= 0x0031\n", (0x19D2, 0x2000)) == ((0x19D2, 0x31),)


def test_switch_db_cache_reads_again_only_when_a_file_changed(tmp_path: Path) -> None:
    _switch_tree(tmp_path)
    root = str(tmp_path)
    cache = SwitchDbCache()
    first = cache.get(root)
    assert first is not None and cache.get(root) is first  # unchanged: the same object
    extra = tmp_path / "etc/usb_modeswitch.d/19d2:0117"
    _write(extra, "TargetProduct=0x0031\n")  # a local addition
    added = cache.get(root)
    assert added is not first and added is not None
    assert added.switches_to[(0x19D2, 0x0117)] == ((0x19D2, 0x0031),)
    _write(extra, "TargetProduct=0x0032, 0x0033\n")  # edited in place
    os.utime(extra, ns=(1, 1))
    edited = cache.get(root)
    assert edited is not None and edited.switches_to[(0x19D2, 0x0117)] == (
        (0x19D2, 0x0032), (0x19D2, 0x0033))
    extra.unlink()
    assert (0x19D2, 0x0117) not in (cache.get(root) or SwitchDb()).switches_to
    assert cache.get(str(tmp_path / "nothing")) is None


def test_installed_switch_db() -> None:
    db = read_switch_db()
    if db is None:
        pytest.skip("usb-modeswitch-data is not installed on this machine")
    assert (0x12D1, 0x1001) in db.switches_to[(0x12D1, 0x1446)]


def _with_db(fs: FakeSystem, db: SwitchDb | None, selector: str = "2-1") -> Findings:
    snap = read_snapshot(fs.roots, resolve(Selector.from_string(selector), fs.roots))
    assert snap.classes is not None
    classes = dataclasses.replace(snap.classes, switch_db=db)
    return inspect(dataclasses.replace(snap, classes=classes))


def test_storage_mode_modem_is_warned_not_refused(tmp_path: Path) -> None:
    fs = FakeSystem(tmp_path / "sys")
    usb = fs.usb_device("2-1", 0x12D1, 0x1446, busnum=2, devnum=7)
    fs.disk(usb, "sr0", 11, 0)
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    _switch_tree(tmp_path / "db")
    f = _with_db(fs, read_switch_db(str(tmp_path / "db")))
    assert f.free
    (w,) = f.warnings
    assert w.kind == "mode-switch" and w.details.mode == "storage"
    assert w.details.switches_to == ("12d1:1001", "12d1:1406")
    assert "a <hostdev> matching vendor:product 12d1:1446 will not follow the switch" in w.text
    assert "bus 2 device 7" in w.text
    assert "warning: 12d1:1446 is a mode-switching device" in as_text(f)
    assert as_json(f)["warnings"][0]["kind"] == "mode-switch"
    # Without the database, a storage-only device with just a CD-ROM drive may be one.
    (maybe,) = _with_db(fs, None).warnings
    assert maybe.details.mode == "maybe-storage"


def test_switched_modem_and_plain_stick(tmp_path: Path) -> None:
    fs = FakeSystem(tmp_path / "sys")
    fs.usb_device("2-1", 0x12D1, 0x1001, busnum=2, devnum=8, iface_class=0xFF)
    fs.usb_device("2-2", 0x46F4, 0x0001, busnum=2, devnum=9)
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    _switch_tree(tmp_path / "db")
    db = read_switch_db(str(tmp_path / "db"))
    (w,) = _with_db(fs, db).warnings
    assert w.details.mode == "switched" and w.details.storage_ids == ("12d1:1446",)
    assert _with_db(fs, db, "2-2").warnings == ()


# ---------------------------------------------------------------------------------------
# Network: which interfaces are the device's (sysfs), and the decisions


def test_device_match_counts_hidden_interfaces(tmp_path: Path) -> None:
    sys = tmp_path / "sys" / PCI / "usb2"
    iface = sys / "2-1" / "2-1:1.0"
    _write(iface / "net" / "enx0011" / "ifindex", "7\n")
    # A second interface moved to another namespace: sysfs hides its directory, but the
    # directory's link count still counts it. Built here as a visible directory.
    (iface / "net" / "wwan0").mkdir()
    m = device_match(str(sys / "2-1"), "2-1")
    assert m.expected == 2
    assert m.belongs(LinkId(123, 4, "wwan0", "2-1:1.0", "usb"))
    assert m.belongs(LinkId(123, 5, "x", "2-1.4:1.0", "usb"))
    assert not m.belongs(LinkId(123, 4, "other", "2-10:1.0", "usb"))
    assert not m.belongs(LinkId(123, 4, "other", "2-1:1.0", "pci"))
    (tmp_path / "stick").mkdir()
    assert device_match(str(tmp_path / "stick"), None).expected == 0


def test_network_device_on_a_recorded_tree_fails_closed(tmp_path: Path) -> None:
    fs = FakeSystem(tmp_path)
    usb = fs.usb_device("2-1", 0x0525, 0xA4A2, busnum=2, devnum=3, iface_class=2)
    _write(usb / "2-1:1.0" / "net" / "usb0" / "ifindex", "3\n")
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    f = _findings(fs)
    assert not f.free
    assert [r.kind for r in f.reasons] == ["unreadable", "unreadable"]


def _iface(name: str = "enx0011", **kw: Any) -> NetInterface:
    base: dict[str, Any] = {"link": LinkId(4026531840, 3, name), "kind": None, "up": True,
                            "operstate": "UP", "rx_bytes": 2048, "tx_bytes": 1024}
    base.update(kw)
    return NetInterface(**base)


def test_network_reason_lines() -> None:
    iface = _iface(
        addresses=(NetAddress(4, "192.168.1.20", 24, "global"),
                   NetAddress(6, "fe80::1", 64, "link")),
        routes=(NetRoute(4, "default", "192.168.1.1", 254),
                NetRoute(6, "default", "fe80::9", 100),
                NetRoute(4, "192.168.1.0/24", None, 254)),
        master="virbr0", master_kind="bridge",
    )
    lines = [f.text for f in net_reasons(NetScan((iface,), expected=1))]
    ns = "in network namespace 4026531840"
    assert lines == [
        f"enx0011 carries the default route (via 192.168.1.1) {ns}",
        f"enx0011 carries the IPv6 default route (via fe80::9, table 100) {ns}",
        f"enx0011 has address 192.168.1.20/24 {ns}",
        f"enx0011 is enslaved to bridge virbr0 {ns}",
        f"enx0011 is up (state UP, 2.0 KiB received, 1.0 KiB sent) {ns}",
    ]
    down = _iface(up=False, operstate="DOWN")
    assert net_reasons(NetScan((down,), expected=1)) == []
    (missing,) = net_reasons(NetScan((), expected=1))
    assert missing.kind == "unreadable"


def _recorded(msg: Any) -> Any:
    """Encode a message as the kernel would send it, and decode it again."""
    msg.encode()
    out = type(msg)(msg.data)
    out.decode()
    return out


def test_routes_from_recorded_messages() -> None:
    from pyroute2.netlink.rtnl.rtmsg import rtmsg  # noqa: PLC0415

    def route(dst_len: int, attrs: list[Any], table: int = 254, family: int = 2,
              proto: int = 4) -> Any:
        m = rtmsg()
        m["family"], m["dst_len"], m["table"], m["type"] = family, dst_len, table, 1
        m["proto"] = proto
        m["attrs"] = [("RTA_TABLE", table), *attrs]
        return _recorded(m)

    msgs = [
        route(24, [("RTA_DST", "10.0.0.0"), ("RTA_OIF", 3)], proto=2),  # connected
        route(0, [("RTA_MULTIPATH", [{"oif": 4, "attrs": [("RTA_GATEWAY", "10.1.0.1")]},
                                     {"oif": 3, "attrs": [("RTA_GATEWAY", "10.0.0.1")]}])]),
        route(32, [("RTA_DST", "10.0.0.2"), ("RTA_OIF", 3)], table=255),  # local table
        route(0, [("RTA_GATEWAY", "fe80::1"), ("RTA_OIF", 3)], family=socket.AF_INET6,
              proto=9),  # learnt from a router advertisement
    ]
    got = routes_from(msgs, 3)
    assert got == (NetRoute(4, "default", "10.0.0.1", 254, 4),
                   NetRoute(6, "default", "fe80::1", 254, 9),
                   NetRoute(4, "10.0.0.0/24", None, 254, 2))
    # Only what someone configured needs putting back after the interface returns.
    assert [r.configured for r in got] == [True, False, False]
    assert routes_from(msgs, 9) == ()


def test_addresses_from_recorded_messages_know_what_is_permanent() -> None:
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # noqa: PLC0415

    def addr(address: str, flags: int, family: int = 2, prefix: int = 24,
             scope: int = 0) -> Any:
        m = ifaddrmsg()
        m["family"], m["prefixlen"], m["index"], m["scope"] = family, prefix, 3, scope
        m["attrs"] = [("IFA_LOCAL" if family == 2 else "IFA_ADDRESS", address),
                      ("IFA_FLAGS", flags)]
        return _recorded(m)

    got = addresses_from([addr("10.0.0.2", 0x80),  # ip addr add: IFA_F_PERMANENT
                          addr("10.0.0.3", 0x0),  # a DHCP lease with a lifetime
                          addr("fe80::1", 0x80, socket.AF_INET6, 64, 253)], 3)
    assert [(a.address, a.permanent, a.scope) for a in got] == [
        ("10.0.0.2", True, "global"), ("10.0.0.3", False, "global"),
        ("fe80::1", True, "link")]


def test_class_snapshot_defaults() -> None:
    assert ClassSnapshot(NetScan(), InputScan()).switch_db is None


def _nic_findings(tmp_path: Path, *interfaces: NetInterface) -> Findings:
    """A USB network adapter (cdc_ether on 2-1:1.0) with the given interfaces, as a live
    read would have found them."""
    fs = FakeSystem(tmp_path)
    usb = fs.usb_device("2-1", 0x0525, 0xA4A2, busnum=2, devnum=3, iface_class=2)
    (usb / "2-1:1.0" / "driver").unlink()
    _link(usb / "2-1:1.0" / "driver", fs.sys / "bus/usb/drivers/cdc_ether")
    fs.process(1, "init", LINUX_NS, ROOT_MOUNT)
    snap = read_snapshot(fs.roots, resolve(Selector.from_string("2-1"), fs.roots))
    assert snap.classes is not None
    net = NetScan(interfaces, (NetNamespaceRef(LINUX_NET, "pid 1 (init)", "/proc/1/ns/net"),),
                  expected=1)
    return inspect(dataclasses.replace(snap, classes=dataclasses.replace(snap.classes,
                                                                         net=net)))


LINUX_NET = 4026531840
USB0 = LinkId(LINUX_NET, 3, "usb0", "2-1:1.0", "usb", "40:54:00:12:34:56")


def test_network_down_plan_keeps_what_was_configured_by_hand(tmp_path: Path) -> None:
    iface = _iface(link=USB0, addresses=(
        NetAddress(4, "10.0.2.15", 24, "global", permanent=True),
        NetAddress(4, "10.0.2.16", 24, "global", permanent=False),  # a DHCP lease
        NetAddress(6, "fe80::1", 64, "link")), routes=(
        NetRoute(4, "default", "10.0.2.2", 254, 4),
        NetRoute(6, "default", "fe80::2", 254, 9),  # router advertisement
        NetRoute(4, "10.0.2.0/24", None, 254, 2)))  # connected
    f = _nic_findings(tmp_path, iface)
    refused = build_plan(f, Settings(), "test")
    assert refused.refused and all('set network = "down"' in r for r in refused.refusals)
    plan = build_plan(f, Settings(network="down"), "test")
    assert not plan.refused, plan.refusals
    down, handoff = plan.steps
    assert isinstance(down, DownLink) and isinstance(handoff, Handoff)
    assert (down.name, down.mac, down.port, down.netns_path) == (
        "usb0", "40:54:00:12:34:56", "2-1", "/proc/1/ns/net")
    assert down.addresses == ((4, "10.0.2.15", 24),)
    assert down.routes == ((4, "default", "10.0.2.2", 254),)
    assert handoff.interfaces == (("2-1:1.0", "cdc_ether"),)
    assert down.describe() == ("take usb0 down in network namespace 4026531840 (keeping "
                               "10.0.2.15/24, route default via 10.0.2.2)")
    # Through the state file and back: the step is the same.
    from safeusb.handover.steps import step_from_json  # noqa: PLC0415

    assert step_from_json(json.loads(json.dumps(down.as_json()))) == down


def test_network_down_refuses_what_it_cannot_put_back(tmp_path: Path) -> None:
    vlan = _iface("usb0.10", link=LinkId(LINUX_NET, 9, "usb0.10"), kind="vlan", lower="usb0")
    f = _nic_findings(tmp_path, _iface(link=USB0, uppers=("usb0.10",)), vlan)
    plan = build_plan(f, Settings(network="down"), "test")
    assert plan.refused
    assert any("cannot put a stacked interface back" in r for r in plan.refusals)


def test_idle_adapter_under_network_down_is_only_unbound_by_qemu(tmp_path: Path) -> None:
    f = _nic_findings(tmp_path, _iface(link=USB0, up=False, operstate="DOWN"))
    plan = build_plan(f, Settings(network="down"), "test")
    (handoff,) = plan.steps
    assert isinstance(handoff, Handoff) and handoff.interfaces == ()


def test_interface_found_again_by_its_usb_interface_when_its_address_changed() -> None:
    """cdc_subset makes up a new hardware address on every bind: the interface under the
    recorded USB interface is the device's, as long as it is the only one there."""
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # noqa: PLC0415

    from safeusb.host.runner import _link_of  # noqa: PLC0415

    def link(index: int, name: str, mac: str, parent: str | None) -> Any:
        m = ifinfmsg()
        m["index"] = index
        m["attrs"] = [("IFLA_IFNAME", name), ("IFLA_ADDRESS", mac)]
        if parent:
            m["attrs"] += [("IFLA_PARENT_DEV_NAME", parent), ("IFLA_PARENT_DEV_BUS_NAME", "usb")]
        return _recorded(m)

    class Links:
        def __init__(self, *msgs: Any) -> None:
            self.msgs = msgs

        def get_links(self) -> tuple[Any, ...]:
            return self.msgs

    step = DownLink("usb0", "aa:c8:ae:f9:31:39", "1-2", LINUX_NET, "", "", True, None, (),
                    (), parent="1-2:1.1")
    lo = link(1, "lo", "00:00:00:00:00:00", None)
    assert _link_of(Links(lo, link(7, "usb0", "AA:C8:AE:F9:31:39", "1-2:1.1")), step) == (
        7, "usb0")
    assert _link_of(Links(lo, link(8, "usb1", "7e:01:02:03:04:05", "1-2:1.1")), step) == (
        8, "usb1")
    two = Links(link(8, "usb1", "7e:01:02:03:04:05", "1-2:1.1"),
                link(9, "usb2", "7e:01:02:03:04:06", "1-2:1.1"))
    assert _link_of(two, step) is None  # which one? not guessed
    assert _link_of(Links(link(8, "usb1", "aa:c8:ae:f9:31:39", "1-3:1.1")), step) is None


def test_switch_db_is_kept_by_the_roots_it_is_read_through(tmp_path: Path) -> None:
    """No module-level cache: each Roots keeps its own database; another Roots reads it
    afresh."""
    from safeusb.host.modeswitch import switch_db  # noqa: PLC0415
    from safeusb.host.roots import Roots  # noqa: PLC0415

    _switch_tree(tmp_path)
    root = str(tmp_path)
    one, two = Roots.host(), Roots.host()
    first = switch_db(one, root)
    assert first is not None and switch_db(one, root) is first
    other = switch_db(two, root)
    assert other == first and other is not first
    assert "modeswitch" in one.kept and one.kept["modeswitch"] is not two.kept["modeswitch"]
