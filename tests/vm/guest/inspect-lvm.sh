#!/bin/bash
# The whole stick an LVM physical volume with one active logical volume.
. "$GUEST_LIB"
lvm_opts=(--config 'activation { udev_sync = 0 udev_rules = 0 } devices { obtain_device_list_from_udev = 0 }')
pvcreate -q "${lvm_opts[@]}" "$LVM_DEV"
vgcreate -q "${lvm_opts[@]}" vgstick "$LVM_DEV"
lvcreate -q "${lvm_opts[@]}" -y -L 8M -n lv1 vgstick
lvs "${lvm_opts[@]}" vgstick
note holders "$(ls "/sys/class/block/$(basename "$LVM_DEV")/holders")"
inspect lvm "$LVM_USB" --json
