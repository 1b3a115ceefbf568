#!/bin/bash
# ext4 on an md raid1 whose two members are the stick's two partitions, mounted with
# data: prepare unmounts and stops the array; release reassembles it from both members
# (under whatever names the disk comes back with) and remounts. At the end the array is
# stopped, so the image is checked from outside through each member on its own.
. "$GUEST_LIB"
. "$GUEST_DIR/handover-lib.sh"
export MDADM_NO_UDEV=1  # no udevd in the guest: mdadm makes its device nodes itself
modprobe raid1 || exit 1
p1=$(partition "$MD_DEV" 1) && p2=$(partition "$MD_DEV" 2) || exit 1
mdadm --create /dev/md/sustick --metadata=1.2 --level=1 --raid-devices=2 --run \
    --assume-clean --homehost=safeusb --name=sustick "$p1" "$p2" || exit 1
md=$(basename "$(readlink -f /dev/md/sustick)")
note md "$md"
mkfs.ext4 -q "/dev/$md" || exit 1
mkdir -p /tmp/su-md
mount "/dev/$md" /tmp/su-md || exit 1
cp "$PAYLOAD/data.bin" /tmp/su-md/data.bin
note offset_kb $(( $(cat "/sys/block/$md/md/dev-$(basename "$p1")/offset") / 2 ))
note size_kb $(( $(cat "/sys/block/$md/size") / 2 ))
run_safeusb prepare prepare "$MD_USB" --policy "$unmount_policy" --json
note md_after "$(grep -c "^$md :" /proc/mdstat)"
note disk_after "$(present "$MD_DEV")"
run_safeusb release release "$MD_USB" --policy "$unmount_policy" --json
note mounted_after_release "$(mounted /tmp/su-md)"
back=$(findmnt -n -o SOURCE /tmp/su-md)
note back "$back"
cat /proc/mdstat >"$OUT/mdstat-after-release"
if [ -n "$back" ]; then
    b=$(basename "$(readlink -f "$back")")
    note raid_disks "$(cat "/sys/block/$b/md/raid_disks")"
    note degraded "$(cat "/sys/block/$b/md/degraded")"
fi
note readback "$(sha /tmp/su-md/data.bin 2>/dev/null)"
note payload "$(sha "$PAYLOAD/data.bin")"
umount /tmp/su-md
[ -n "$back" ] && mdadm --stop "$back"
sync
