#!/bin/bash
# ext4 on an LVM logical volume spanning the stick, mounted with data: prepare unmounts and
# deactivates the volume; release reactivates and remounts it.
. "$GUEST_LIB"
. "$GUEST_DIR/handover-lib.sh"
pvcreate -q "$LVM_DEV"
vgcreate -q vgstick "$LVM_DEV"
lvcreate -q -y -L 16M -n lv1 vgstick
wait_for /dev/vgstick/lv1 || exit 1
mkfs.ext4 -q /dev/vgstick/lv1
mkdir -p /tmp/su-lvm
mount /dev/vgstick/lv1 /tmp/su-lvm
cp "$PAYLOAD/data.bin" /tmp/su-lvm/data.bin
note mounted_before "$(mounted /tmp/su-lvm)"
run_safeusb prepare prepare "$LVM_USB" --policy "$unmount_policy" --json
note lv_after "$([ -e /dev/mapper/vgstick-lv1 ] && echo 1 || echo 0)"
note disk_after "$(present "$LVM_DEV")"
run_safeusb release release "$LVM_USB" --policy "$unmount_policy" --json
note mounted_after_release "$(mounted /tmp/su-lvm)"
grep " /tmp/su-lvm " /proc/self/mountinfo >"$OUT/mounts-after-release"
lvs >"$OUT/lvs-after-release" 2>&1
note readback "$(sha /tmp/su-lvm/data.bin 2>/dev/null)"
note payload "$(sha "$PAYLOAD/data.bin")"
