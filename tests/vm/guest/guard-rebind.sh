#!/bin/bash
# The guard on: an idle stick handed over by `safeusb prepare` (usb-storage unbound, the
# interface left without a driver, as before QEMU opens it); every way of binding it again
# is tried, then safeusb's own release gives it back.
. "$GUEST_DIR/guard-lib.sh"
guard_on
intf=$(storage_intf "$REBIND_USB")
note intf "$intf"
drv() { basename "$(readlink "/sys/bus/usb/devices/$intf/driver" 2>/dev/null)"; }
disks() { ls -d /sys/bus/usb/devices/"$intf"/host*/target*/*/block/* 2>/dev/null | wc -l; }
"$SAFEUSB" prepare "$REBIND_USB" >"$OUT/prepare.out" 2>"$OUT/prepare.err"
note prepare_rc $?
note driver_prepared "$(drv)"
"$SAFEUSB" guard status >"$OUT/guard-status-handed.out" 2>&1
try() {  # try NAME FILE VALUE
    echo "$3" >"$2" 2>"$OUT/$1.err"
    note "$1_rc" $?
    note "$1_err" "$(tr -d '\n' <"$OUT/$1.err")"
}
try bind /sys/bus/usb/drivers/usb-storage/bind "$intf"
try probe /sys/bus/usb/drivers_probe "$intf"
try new_id /sys/bus/usb/drivers/usb-storage/new_id "46f4 0001"
try config "/sys/bus/usb/devices/$REBIND_USB/bConfigurationValue" 1
try auth_intf "/sys/bus/usb/devices/$intf/authorized" 1
udevadm trigger --action=add "/sys/bus/usb/devices/$intf" "/sys/bus/usb/devices/$REBIND_USB" \
    >"$OUT/udev.out" 2>&1
note udev_rc $?
python3 - "$REBIND_BUSDEV" "${intf##*.}" >"$OUT/connect.out" 2>&1 <<'PY'
import errno, fcntl, os, struct, sys
bus, dev = (int(x) for x in sys.argv[1].split(":"))
fd = os.open(f"/dev/bus/usb/{bus:03d}/{dev:03d}", os.O_RDWR)
try:  # USBDEVFS_IOCTL carrying USBDEVFS_CONNECT (libusb_attach_kernel_driver)
    fcntl.ioctl(fd, 0xC0105512, bytearray(struct.pack("iiQ", int(sys.argv[2]), 0x5517, 0)))
    print("CONNECT", 0)
except OSError as e:
    print("CONNECT", errno.errorcode.get(e.errno, e.errno))
PY
sleep 3  # usb-storage scans a disk 1 s (delay_use) after it binds
note driver_after "$(drv)"
note disks_after "$(disks)"
"$SAFEUSB" release "$REBIND_USB" >"$OUT/release.out" 2>"$OUT/release.err"
note release_rc $?
note driver_released "$(drv)"
for _ in $(seq 1 100); do
    [ "$(disks)" -gt 0 ] && break
    sleep 0.2
done
note disks_released "$(disks)"
"$SAFEUSB" guard status >"$OUT/guard-status-after.out" 2>&1
# nothing handed over any more: the same probe is let through (the interface has its
# driver, so it does nothing)
try probe_after /sys/bus/usb/drivers_probe "$intf"
