#!/bin/bash
# Mounted ext4 with 4 MiB dirty, policy unmount: prepare flushes, unmounts and unbinds;
# the live attach then succeeds; after detach, release rebinds and remounts.
. "$GUEST_LIB"
. "$GUEST_DIR/handover-lib.sh"
mkdir -p /tmp/give
mount -t ext4 "$GIVE_DEV" /tmp/give
cp "$PAYLOAD/data.bin" /tmp/give/data.bin
note dirty_kb "$(bdi_stat "$GIVE_DEV" BdiReclaimable)"
run_safeusb prepare prepare "$GIVE_USB" --policy "$unmount_policy" --json
note mounted_after_prepare "$(mounted /tmp/give)"
note disk_after_prepare "$(present "$GIVE_DEV")"
note driver_after_prepare "$(basename "$(readlink "/sys/bus/usb/devices/$GIVE_USB:1.0/driver" 2>/dev/null)" 2>/dev/null)"
note state_mode "$(stat -c %a "/run/safeusb/$GIVE_USB.json" 2>/dev/null)"
hostdev_xml "$GIVE_BUSDEV" >/tmp/give-hostdev.xml
virsh attach-device g1 /tmp/give-hostdev.xml --live >"$OUT/attach.out" 2>&1
note attach_rc $?
sleep 2
virsh detach-device g1 /tmp/give-hostdev.xml --live >"$OUT/detach.out" 2>&1
note detach_rc $?
sleep 2
run_safeusb release release "$GIVE_USB" --policy "$unmount_policy" --json
note mounted_after_release "$(mounted /tmp/give)"
note readback "$(sha /tmp/give/data.bin 2>/dev/null)"
note payload "$(sha "$PAYLOAD/data.bin")"
