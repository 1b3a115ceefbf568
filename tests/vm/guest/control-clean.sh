#!/bin/bash
# The careful way by hand: write, unmount, then attach. Nothing may be lost; this
# shows the outside check does not report loss where there is none.
. "$GUEST_LIB"
mkdir -p /tmp/clean
mount -t ext4 "$CLEAN_DEV" /tmp/clean
cp "$PAYLOAD/data.bin" /tmp/clean/data.bin
umount /tmp/clean
hostdev_xml "$CLEAN_BUSDEV" >/tmp/hostdev-clean.xml
virsh attach-device g1 /tmp/hostdev-clean.xml --live >"$OUT/attach.out" 2>&1
note attach_rc $?
cat "$OUT/attach.out"
