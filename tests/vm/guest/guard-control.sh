#!/bin/bash
# Control: the guard off, `echo INTF > .../usb-storage/unbind` yanks a mounted stick with
# 4 MiB unwritten: the data does not reach it.
. "$GUEST_DIR/guard-lib.sh"
guard_fs
"$SAFEUSB" guard disable >/dev/null 2>&1
intf=$(storage_intf "$CONTROL_USB")
mount_dirty "$CONTROL_DEV" /tmp/g-control
echo "$intf" >/sys/bus/usb/drivers/usb-storage/unbind 2>"$OUT/unbind.err"
note unbind_rc $?
sleep 1
sync 2>/dev/null
after "$CONTROL_DEV" /tmp/g-control "$CONTROL_USB" "$intf"
