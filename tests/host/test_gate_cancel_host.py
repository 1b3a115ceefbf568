"""A decision that outlasts the gate's deadline is cancelled, and the refusal reaches the
client only once the decision has put the host back: never while its work goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.host.test_gate import QEMU, gated

pytestmark = [pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
              pytest.mark.fault]


def test_refusal_waits_for_the_cancelled_decision_to_undo(tmp_path: Path) -> None:
    mark = tmp_path / "host-changed"
    with gated(tmp_path, "tests.host.gate_decisions:slow_then_undo",
               ("--decision-timeout", "1"), {"SAFEUSB_TEST_MARK": str(mark)}) as g:
        reply = g.cmd("device_add", driver="usb-host", hostbus=1, hostaddr=3, id="h1")
        # The answer came only after the decision undid its change.
        assert not mark.exists(), "refused while the host was still changed"
        assert reply["error"]["desc"] == (
            "safeusb: no decision within 1 s; prepare was cancelled; host state: as before")
        assert "cancelling it" in g.log.read_text()
        names = {p["name"] for p in g.cmd("qom-list", path="/machine/peripheral")["return"]}
        assert "h1" not in names
