#!/bin/bash
# The guard on, the stick idle (nothing mounted or open): usbredirect's first attempt is
# refused; safeusbd prepares the stick by the policy (holds it, unbinds usb-storage) and
# the second attempt takes it.
. "$GUEST_DIR/guard-lib.sh"
guard_on
intf=$(storage_intf "$IDLE_USB")
note intf "$intf"
redirect "$IDLE_USB" first 30 "$intf"
note driver_after_first "$(driver_of "$intf")"
wait_prepared "$IDLE_USB" "$intf"
redirect "$IDLE_USB" second 30 "$intf"
"$SAFEUSB" guard status >"$OUT/guard-status.out" 2>&1
note status_rc $?
"$SAFEUSB" status >"$OUT/status.out" 2>&1
"$SAFEUSB" status --json >"$OUT/status.json" 2>&1
