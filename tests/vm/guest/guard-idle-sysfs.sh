#!/bin/bash
# The guard on, the stick idle (nothing mounted or open): `echo INTF >
# /sys/bus/usb/drivers/usb-storage/unbind` is refused; safeusbd prepares the stick by the
# policy (holds it, unbinds usb-storage); then the same echo again.
. "$GUEST_DIR/guard-lib.sh"
guard_on
intf=$(storage_intf "$IDLE_SYSFS_USB")
note intf "$intf"
note port "$IDLE_SYSFS_USB"
note disks_before "$(ls -d "/sys/bus/usb/devices/$intf"/host*/target*/*/block/* 2>/dev/null | wc -l)"
unbind() {  # unbind TAG: the echo, its exit code and error, and the driver after it
    echo "$intf" >/sys/bus/usb/drivers/usb-storage/unbind 2>"$OUT/$1.err"
    note "$1_rc" $?
    note "$1_err" "$(tr -d '\n' <"$OUT/$1.err")"
    note "$1_driver" "$(driver_of "$intf")"
}
unbind first
wait_prepared "$IDLE_SYSFS_USB" "$intf"
unbind second
note disks_after "$(ls -d "/sys/bus/usb/devices/$intf"/host*/target*/*/block/* 2>/dev/null | wc -l)"
# what safeusbd made of each attempt
for _ in $(seq 1 50); do
    grep -q "$IDLE_SYSFS_USB is already taken by safeusb" "$SHARE/out/safeusbd.log" && break
    sleep 0.2
done
grep "guard: .*$intf\|guard: .*$IDLE_SYSFS_USB" "$SHARE/out/safeusbd.log" >"$OUT/log.out"
cat "$OUT/log.out"
