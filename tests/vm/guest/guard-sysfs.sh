#!/bin/bash
# The guard on: sysfs unbind, authorized (device and interface), remove,
# bConfigurationValue and both usbfs detach ioctls on a mounted stick with 4 MiB unwritten.
. "$GUEST_DIR/guard-lib.sh"
guard_on
intf=$(storage_intf "$SYSFS_USB")
note intf "$intf"
mount_dirty "$SYSFS_DEV" /tmp/g-sysfs
try() {  # try NAME FILE VALUE
    echo "$3" >"$2" 2>"$OUT/$1.err"
    note "$1_rc" $?
    note "$1_err" "$(tr -d '\n' <"$OUT/$1.err")"
}
try unbind /sys/bus/usb/drivers/usb-storage/unbind "$intf"
try auth_dev "/sys/bus/usb/devices/$SYSFS_USB/authorized" 0
try auth_intf "/sys/bus/usb/devices/$intf/authorized" 0
try remove "/sys/bus/usb/devices/$SYSFS_USB/remove" 1
try config "/sys/bus/usb/devices/$SYSFS_USB/bConfigurationValue" 0
usbfs_ioctls "$SYSFS_BUSDEV" "${intf##*.}" ioctls
cat "$OUT/ioctls.out"
after "$SYSFS_DEV" /tmp/g-sysfs "$SYSFS_USB" "$intf"
