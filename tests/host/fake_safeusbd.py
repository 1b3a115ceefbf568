"""safeusbd's own server (socket, identification by the kernel's credentials, protocol,
cancelling when the client stops writing) with a prepare the host tests control: it
changes the "host" (a marker file), waits to be cancelled, takes a second to put the
marker back, and says so. Run as `python -m tests.host.fake_safeusbd SOCKET MARK`."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from safeusb.safeusbd import protocol as proto
from safeusb.safeusbd.peer import MachineScope
from safeusb.safeusbd.protocol import DeviceArgs
from safeusb.safeusbd.server import Daemon, Done, bind_socket, identify

HANG = 60.0  # a bound on a hang only


def no_libvirt(scope: MachineScope) -> tuple[str | None, str]:
    return None, "no libvirt in this test"


class SlowThenUndo:
    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def inspect(self, args: DeviceArgs, caller_pid: int | None = None) -> dict[str, Any]:
        return {"free": True}

    def prepare(self, args: DeviceArgs, cancel: threading.Event) -> Done:
        self.mark.write_text("changed")
        if not cancel.wait(HANG):
            return Done(False, {"ok": False}, proto.FAILED, "never cancelled")
        (self.mark.parent / "cancel-seen").write_text(f"bus {args.bus} addr {args.addr} "
                                                      f"domain {args.domain}")
        time.sleep(1.0)
        self.mark.unlink()
        return Done(False, {"ok": False}, proto.FAILED,
                    "prepare was cancelled; host state: as before")

    def release(self, args: DeviceArgs, only_domain: str | None) -> Done:
        return Done(True, {"ok": True})


def main(argv: list[str]) -> int:
    daemon = Daemon(bind_socket(argv[1]), lambda conn: identify(conn, no_libvirt),
                    SlowThenUndo(Path(argv[2])))
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    daemon.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
