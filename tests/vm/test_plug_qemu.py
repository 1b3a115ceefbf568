"""The harness's plug and pull (PlugService) against a real QEMU, without a guest kernel:
a stick whose image is a -blockdev node can be pulled (device_del) and plugged in again
(device_add of the same drive, serial and id) as often as a scenario asks, while a
-drive is deleted with its device (so it could not be plugged in again)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from safeusb.lab.harness import Image, PlugService, Stick, qmp_commands

pytestmark = pytest.mark.vm


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[tuple[Path, Stick, Path]]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not found")
    image = tmp_path / "auto.img"
    Image.raw(8).build(image)
    stick = Stick("auto", plugged=False)
    sock = tmp_path / "qmp.sock"
    argv = ["qemu-system-x86_64", "-M", "pc", "-nodefaults", "-display", "none", "-S",
            "-device", "qemu-xhci,id=xhci", *stick.qemu_args(0, image),
            # a stick given as -drive, the form the other sticks of a boot have
            *Stick("fixed").qemu_args(1, image.with_name("fixed.img")),
            "-qmp", f"unix:{sock},server=on,wait=off"]
    Image.raw(8).build(image.with_name("fixed.img"))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "QEMU's monitor did not appear"
            time.sleep(0.05)
        yield sock, stick, tmp_path / "plug"
    finally:
        proc.kill()
        proc.wait()


def _has(sock: Path, device_id: str) -> bool:
    return qmp_commands(sock, [{"execute": "qom-get", "arguments": {
        "path": f"/machine/peripheral/{device_id}", "property": "type"}}]) == "ok"


def test_plug_pull_plug_again(qemu: tuple[Path, Stick, Path]) -> None:
    sock, stick, requests = qemu
    service = PlugService(requests, sock, {"AUTO": stick.device_add(0)})
    assert not _has(sock, "usbstick0")
    assert service.act("1-plug-AUTO") == "ok" and _has(sock, "usbstick0")
    assert service.act("2-pull-AUTO") == "ok"
    deadline = time.monotonic() + 10
    while _has(sock, "usbstick0"):
        assert time.monotonic() < deadline, "the stick did not go"
        time.sleep(0.05)
    assert service.act("3-plug-AUTO") == "ok" and _has(sock, "usbstick0")
    assert service.act("4-eject-AUTO").startswith("error: not a request")
    assert service.act("5-plug-NONE").startswith("error: not a request")


def test_a_drive_goes_with_its_device(qemu: tuple[Path, Stick, Path]) -> None:
    """Why plugged=False sticks are -blockdev nodes: device_del of a -drive stick deletes
    its drive, and device_add then finds none."""
    sock, _, requests = qemu
    fixed = Stick("fixed")
    service = PlugService(requests, sock, {"FIXED": fixed.device_add(1)})
    assert service.act("1-pull-FIXED") == "ok"
    # The plug is tried again while the drive is still in use; once the device has gone
    # the drive has gone with it.
    assert "can't find value 'stick1'" in service.act("2-plug-FIXED")


def test_the_service_answers_requests_in_files(qemu: tuple[Path, Stick, Path]) -> None:
    sock, stick, requests = qemu
    service = PlugService(requests, sock, {"AUTO": stick.device_add(0)})
    service.start()
    try:
        (requests / "10-plug-AUTO").touch()
        done = requests / "10-plug-AUTO.done"
        deadline = time.monotonic() + 10
        while not done.exists():
            assert time.monotonic() < deadline, "no answer"
            time.sleep(0.05)
    finally:
        service.stop()
    assert done.read_text() == "ok\n" and _has(sock, "usbstick0")
