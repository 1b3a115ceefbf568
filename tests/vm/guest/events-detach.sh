#!/bin/bash
# (c) A mounted stick with 4 MiB unwritten goes to g2 through the gate (mount = "unmount",
# restore = true); `virsh detach-device --live` lets go of it; safeusbd gives it back on
# its own: bound, mounted again where it was, the data there, the record gone.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
. "$GUEST_DIR/events-lib.sh"
mp=/tmp/su-back
handed_over_then BACK "$mp"
run_step detach virsh detach-device "$DOM" /tmp/BACK-hostdev.xml --live
back_on_host BACK "$mp"
note in_domain "$(virsh dumpxml "$DOM" | grep -c "<hostdev mode='subsystem' type='usb'")"
grep -F "safeusb-qemu-gate[" "/var/log/libvirt/qemu/$DOM.log" >"$OUT/gate.log" 2>/dev/null
