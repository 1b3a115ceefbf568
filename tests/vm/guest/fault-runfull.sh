#!/bin/bash
# /run/safeusb full: prepare cannot write the record release needs. With no room at all
# nothing is done; with room for one record only, the first goes in and the next does
# not, and what was done is undone. Either way the stick stays mounted with its data.
. "$GUEST_LIB"
. "$GUEST_DIR/handover-lib.sh"
mkdir -p /tmp/su-full /run/safeusb
mount -t ext4 "$FULL_DEV" /tmp/su-full
cp "$PAYLOAD/data.bin" /tmp/su-full/data.bin
want=$(sha "$PAYLOAD/data.bin")
page=$(getconf PAGE_SIZE)
mount -t tmpfs -o "size=$page,mode=0700" safeusb-full /run/safeusb
key=$FULL_USB
head -c "$page" /dev/zero >/run/safeusb/filler 2>/dev/null
run_safeusb full prepare "$FULL_USB" --policy "$unmount_policy" --json
note mounted_full "$(mounted /tmp/su-full)"
[ "$(sha /tmp/su-full/data.bin)" = "$want" ] && note intact_full 1
note record_full "$(ls /run/safeusb/"$key".json 2>/dev/null | wc -l)"
rm -f /run/safeusb/filler
run_safeusb onepage prepare "$FULL_USB" --policy "$unmount_policy" --json
note mounted_onepage "$(mounted /tmp/su-full)"
[ "$(sha /tmp/su-full/data.bin)" = "$want" ] && note intact_onepage 1
note record_onepage "$(ls /run/safeusb/"$key".json 2>/dev/null | wc -l)"
umount /run/safeusb
# With room again, the same stick is handed over and given back.
run_safeusb again prepare "$FULL_USB" --policy "$unmount_policy"
run_safeusb release release "$FULL_USB" --policy "$unmount_policy"
note released "$(cat "$OUT/release.rc")"
wait_for /tmp/su-full/data.bin 20 && note remounted "$(mounted /tmp/su-full)"
