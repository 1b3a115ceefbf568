#!/bin/bash
# The whole stick an LVM physical volume of "vgstick" with one active LV "lv1".
. "$GUEST_LIB"
lvm_opts=(--config 'activation { udev_sync = 0 udev_rules = 0 } devices { obtain_device_list_from_udev = 0 }')
pvcreate -q "${lvm_opts[@]}" "$STICK_DEV"
vgcreate -q "${lvm_opts[@]}" vgstick "$STICK_DEV"
lvcreate -q "${lvm_opts[@]}" -y -L 8M -n lv1 vgstick
record_fixture
