"""`safeusb inspect` on devices that are not storage, on a real kernel: an FTDI serial
adapter, a CDC Ethernet adapter and a USB keyboard, as QEMU emulates them.

Also a USB device that is only a CD-ROM drive (mode switching), a USB speaker and a USB
tablet. One
boot, no sticks; the scenarios run in order and each uses its own device. The network
scenarios share the adapter and run one after the other; the tablet and keyboard
scenarios run last, since they unbind QEMU's PS/2 mouse and keyboard.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from safeusb.lab.harness import (
    Boot,
    BootResult,
    InspectRun,
    Runner,
    Scenario,
    ScenarioResult,
    UsbDevice,
)

pytestmark = pytest.mark.vm

#: QEMU usb-storage with an empty CD drive: a device that is only a CD-ROM drive.
CDROM = UsbDevice("usb-storage", ("drive=ucd0",), ("-drive", "if=none,id=ucd0,media=cdrom"))
#: QEMU's USB speaker (46f4:0002, snd-usb-audio), playing into nothing.
AUDIO = UsbDevice("usb-audio", ("audiodev=uaudio0",), ("-audiodev", "none,id=uaudio0"))

BOOT = Boot(
    name="classes",
    devices=(UsbDevice.serial_port(), UsbDevice.net(), CDROM, AUDIO, UsbDevice.tablet(),
             UsbDevice.kbd()),
    scenarios=(
        Scenario("serial", "classes-serial.sh", timeout=300),
        Scenario("net", "classes-net.sh", timeout=400),
        Scenario("net-down", "classes-net-down.sh", timeout=300),
        Scenario("cdrom", "classes-cdrom.sh", timeout=300),
        Scenario("audio", "classes-audio.sh", timeout=300),
        Scenario("tablet", "classes-tablet.sh", timeout=300),
        Scenario("kbd", "classes-kbd.sh", timeout=400),
    ),
    modules=("xhci_pci", "usbhid", "hid_generic", "evdev", "ftdi_sio", "cdc_ether",
             "usb_storage", "sr_mod", "snd_usb_audio"),
)


@pytest.fixture(scope="module")
def vm(vm_runner: Runner, safeusb_cli: str) -> BootResult:
    return vm_runner.run(BOOT)


def ran(vm: BootResult, name: str) -> ScenarioResult:
    r = vm.scenario(name)
    r.expect_ran()
    return r


def inspected(r: ScenarioResult, tag: str, rc: int) -> tuple[InspectRun, dict[str, Any]]:
    """The inspect step ``tag`` exited ``rc`` with valid JSON that agrees with it."""
    run = r.inspect(tag)
    r.expect(run.rc == rc, f"{tag}: expected exit {rc}\n{run}")
    try:
        data = run.json
    except ValueError:
        r.fail(f"{tag}: --json output is not JSON\n{run}")
    r.expect(data.get("free") is (rc == 0), f"{tag}: \"free\" disagrees with exit {rc}\n{run}")
    r.expect(bool(data.get("reasons")) is (rc == 1),
             f"{tag}: reasons disagree with exit {rc}\n{run}")
    return run, data


def kinds(data: dict[str, Any]) -> set[str]:
    return {x["kind"] for x in data.get("reasons", [])}


# ------------------------------------------------------------------------- serial


def test_serial_idle_is_free(vm: BootResult) -> None:
    r = ran(vm, "serial")
    r.expect(r.notes().get("driver") == "ftdi_sio",
             f"the adapter's interface is not bound to ftdi_sio ({r.notes()})")
    for tag in ("idle", "idle-vidpid"):
        inspected(r, tag, 0)


def test_serial_port_held_open(vm: BootResult) -> None:
    r = ran(vm, "serial")
    run, data = inspected(r, "held", 1)
    pid = int(r.notes()["pid"])
    mine = [x for x in run.reasons("open") if x.get("pid") == pid]
    r.expect(mine, f"no open reason for pid {pid}, which holds /dev/ttyUSB0\n{run}")
    r.expect(any(x.get("device") == "/dev/ttyUSB0" for x in mine),
             f"the open reason does not name /dev/ttyUSB0\n{run}")
    r.expect(kinds(data) == {"open"}, f"expected only the open reason\n{run}")
    text = r.inspect("held-text")
    r.expect(text.rc == 1 and f"pid {pid} (sleep) has the serial port /dev/ttyUSB0 open"
             in text.stdout, f"the text does not name the serial port\n{text}")


# ------------------------------------------------------------------------- network


def interfaces(data: dict[str, Any]) -> list[dict[str, Any]]:
    return list(data.get("network_interfaces", []))


def test_net_interface_down_without_address_is_free(vm: BootResult) -> None:
    """An interface that is down and has no address carries nothing: the device is free,
    and the interface is still listed."""
    r = ran(vm, "net")
    ifname = r.notes()["ifname"]
    run, data = inspected(r, "down", 0)
    found = interfaces(data)
    r.expect([i["name"] for i in found] == [ifname],
             f"expected exactly interface {ifname} listed\n{run}")
    r.expect(found[0]["up"] is False and found[0]["addresses"] == [],
             f"{ifname} should be listed down, without address\n{run}")


def test_net_default_route(vm: BootResult) -> None:
    r = ran(vm, "net")
    ifname = r.notes()["ifname"]
    run, _ = inspected(r, "route", 1)
    net = run.reasons("network")
    causes = {x.get("cause") for x in net if x.get("interface") == ifname}
    r.expect(any(x.get("cause") == "default-route" and x.get("gateway") == "10.99.0.1"
                 and x.get("interface") == ifname for x in net),
             f"no network reason naming the default route via 10.99.0.1 on {ifname}\n{run}")
    r.expect({"address", "up"} <= causes, f"expected address and up reasons too\n{run}")


def test_net_moved_to_named_namespace(vm: BootResult) -> None:
    r = ran(vm, "net")
    n = r.notes()
    ifname, netns = n["ifname"], int(n["netns"])
    r.expect(netns != int(n["own_netns"]), f"ip netns add made no new namespace ({n})")
    run, data = inspected(r, "netns", 1)
    routes = [x for x in run.reasons("network")
              if x.get("cause") == "default-route" and x.get("netns") == netns]
    r.expect(routes, f"no default-route reason in network namespace {netns}\n{run}")
    r.expect(routes[0].get("netns_where") == "/run/netns/x",
             f"the namespace should be named by /run/netns/x\n{run}")
    r.expect([(i["name"], i["netns"]) for i in interfaces(data)] == [(ifname, netns)],
             f"expected {ifname} in {netns} only\n{run}")
    r.expect("unreadable" not in kinds(data), f"nothing should be unreadable\n{run}")
    down, data = inspected(r, "netns-down", 0)
    r.expect([(i["name"], i["netns"]) for i in interfaces(data)] == [(ifname, netns)],
             f"the interface, down in {netns}, should still be listed\n{down}")


def test_net_down_and_put_back_in_its_namespace(vm: BootResult) -> None:
    """network = "down": refused by default; with the policy the adapter's interface is
    taken down and its driver unbound; release binds it, the kernel makes a new interface
    in the host's namespace, and it is moved back into x with its name, address, state
    and routes."""
    r = ran(vm, "net-down")
    n = r.notes()
    refused = json.loads(r.file("refused.out") or "{}")
    r.expect(r.file("refused.rc").strip() == "1"
             and any('set network = "down"' in x for x in refused.get("reasons", [])),
             f"expected a refusal pointing at network = \"down\":\n{r.file('refused.out')}")
    out = json.loads(r.file("prepare.out") or "{}")
    r.expect(r.file("prepare.rc").strip() == "0" and out.get("ok")
             and [s["kind"] for s in out["steps"]] == ["link-down", "handoff"],
             f"prepare under network = \"down\" failed:\n{r.file('prepare.out')}\n"
             f"{r.file('prepare.err')}")
    r.expect(n.get("in_x_after_prepare") == "0" and n.get("in_host_after_prepare") == "0",
             f"the interface should be gone once its driver is unbound ({n})")
    back = json.loads(r.file("release.out") or "{}")
    r.expect(r.file("release.rc").strip() == "0" and back.get("ok"),
             f"release failed:\n{r.file('release.out')}\n{r.file('release.err')}")
    r.expect(all(n.get(k) == "1" for k in ("up_after", "addr_after", "default_after",
                                            "route_after"))
             and n.get("in_host_after") == "0",
             f"{n.get('ifname')} is not back in x as it was ({n})\n{r.stdout}")
    print(f"net-down: USB interfaces and drivers {n.get('drivers')}; after release "
          f"{n.get('drivers_after')}")


def test_sound_card_idle_is_free(vm: BootResult) -> None:
    r = ran(vm, "audio")
    card = r.notes()["card"]
    run, data = inspected(r, "idle", 0)
    paths = {x["path"] for x in data["nodes"]}
    r.expect(f"/dev/snd/controlC{card}" in paths,
             f"/dev/snd/controlC{card} is not among the device's nodes\n{run}")


@pytest.mark.parametrize(("tag", "what"), [("control", "the sound card"),
                                           ("pcm", "the sound device")])
def test_sound_node_held_open(vm: BootResult, tag: str, what: str) -> None:
    r = ran(vm, "audio")
    n = r.notes()
    node = f"/dev/snd/controlC{n['card']}" if tag == "control" else f"/dev/snd/{n['pcm']}"
    pid = int(n[f"{tag}_pid"])
    run, data = inspected(r, tag, 1)
    mine = [x for x in run.reasons("open") if x.get("pid") == pid and x.get("device") == node]
    r.expect(mine, f"no open reason for pid {pid} holding {node}\n{run}")
    r.expect(f"has {what} {node} open" in mine[0]["text"],
             f"the reason does not call {node} {what}\n{run}")
    r.expect(kinds(data) == {"open"}, f"expected only the open reason\n{run}")


# ------------------------------------------------------------------------- mode switch


def test_cdrom_only_device_with_switch_database(vm: BootResult) -> None:
    """46f4:0001 is not in the usb_modeswitch database: no warning, and free."""
    r = ran(vm, "cdrom")
    n = r.notes()
    r.expect(n.get("sr", "").startswith("sr"), f"no CD-ROM drive in the guest ({n})")
    r.expect(int(n.get("db") or 0) >= 2,
             f"this machine's usb_modeswitch database is not visible in the guest ({n})")
    run, data = inspected(r, "db", 0)
    r.expect(n["sr"] in {b["name"] for b in data["block_devices"]},
             f"{n['sr']} is not among block_devices\n{run}")
    r.expect(data["warnings"] == [], f"expected no warning\n{run}")


def test_cdrom_only_device_without_switch_database(vm: BootResult) -> None:
    r = ran(vm, "cdrom")
    run, data = inspected(r, "nodb", 0)
    modes = [w.get("mode") for w in data["warnings"] if w.get("kind") == "mode-switch"]
    r.expect(modes == ["maybe-storage"],
             f"expected one mode-switch warning (maybe-storage)\n{run}")


# ------------------------------------------------------------------------- keyboard


def inputs(r: ScenarioResult, name: str) -> list[list[str]]:
    """Lines of input_facts: sysname, name, phys, handlers, ev, key, sysfs path."""
    return [ln.split("|") for ln in r.file(name).splitlines() if ln.count("|") >= 6]


def other_keyboards(r: ScenarioResult, name: str, usb: str) -> list[list[str]]:
    """Input devices outside the USB device that call themselves keyboards."""
    return [i for i in inputs(r, name) if f"/{usb}/" not in i[6] and "keyboard" in i[1].lower()]


def test_kbd_beside_ps2_keyboard_is_not_last(vm: BootResult) -> None:
    r = ran(vm, "kbd")
    usb = r.notes()["usb"]
    others = other_keyboards(r, "inputs", usb)
    run, data = inspected(r, "other", 0)
    listed = data.get("input_devices", [])
    r.expect(any(d["keyboard"] for d in listed),
             f"the usb-kbd is not listed as a keyboard\n{run}\ninputs: {r.file('inputs')}")
    if not others:
        r.fail(f"the guest has no other keyboard to test against:\n{r.file('inputs')}")
    r.expect(not run.reasons("last-input"),
             f"last-input although {others[0][1]} is another keyboard\n{run}")


def test_kbd_event_node_held_open(vm: BootResult) -> None:
    r = ran(vm, "kbd")
    n = r.notes()
    r.expect(n.get("event"), f"the usb-kbd has no event node (is evdev loaded?)\n"
             f"{r.file('inputs')}")
    run, _ = inspected(r, "held", 1)
    pid = int(n["pid"])
    node = f"/dev/input/{n['event']}"
    r.expect(any(x.get("pid") == pid and x.get("device") == node
                 for x in run.reasons("open")),
             f"no open reason for pid {pid} holding {node}\n{run}")
    r.expect(not run.reasons("last-input"), f"last-input with another keyboard\n{run}")


def test_kbd_beside_inhibited_ps2_keyboard_is_last_input(vm: BootResult) -> None:
    r = ran(vm, "kbd")
    n = r.notes()
    if "inhibited" not in n:
        pytest.skip(f"the guest kernel has no inhibited attribute on {n.get('ps2')}")
    r.expect(n["inhibited"] == "1", f"the kernel did not inhibit {n['ps2']} ({n})")
    run, _ = inspected(r, "inhibited", 1)
    last = run.reasons("last-input")
    r.expect(last and last[0].get("input") == "keyboard"
             and last[0].get("inhibited") == [n["ps2"]],
             f"expected last-input for the keyboard, naming {n['ps2']} inhibited\n{run}")
    inspected(r, "uninhibited", 0)


def test_kbd_only_keyboard_is_last_input(vm: BootResult) -> None:
    r = ran(vm, "kbd")
    usb = r.notes()["usb"]
    others = other_keyboards(r, "inputs-after", usb)
    r.expect(not others, f"another keyboard is left after unbinding atkbd: {others}")
    run, _ = inspected(r, "last", 1)
    last = run.reasons("last-input")
    r.expect(last and last[0].get("input") == "keyboard",
             f"expected a last-input reason for the keyboard\n{run}")
    text = r.inspect("last-text")
    r.expect("last keyboard" in text.stdout, f"the text does not say last keyboard\n{text}")


def test_tablet_beside_ps2_mouse_is_not_last(vm: BootResult) -> None:
    r = ran(vm, "tablet")
    usb = r.notes()["usb"]
    mice = [i for i in inputs(r, "inputs") if f"/{usb}/" not in i[6] and "mouse" in i[3]]
    r.expect(mice, f"the guest has no other mouse to test against:\n{r.file('inputs')}")
    run, data = inspected(r, "other", 0)
    r.expect(any(d["pointer"] for d in data.get("input_devices", [])),
             f"the tablet is not listed as a pointing device\n{run}")


def test_tablet_only_pointer_is_last_input(vm: BootResult) -> None:
    r = ran(vm, "tablet")
    usb = r.notes()["usb"]
    mice = [i for i in inputs(r, "inputs-after") if f"/{usb}/" not in i[6] and "mouse" in i[3]]
    r.expect(not mice, f"another mouse is left after unbinding psmouse: {mice}")
    run, _ = inspected(r, "last", 1)
    last = run.reasons("last-input")
    r.expect([x.get("input") for x in last] == ["pointer"],
             f"expected one last-input reason, for the pointer\n{run}")
