#!/bin/bash
# safeusb demo, without safeusb: a mounted stick with fresh data attached live.
. "$GUEST_LIB"
mkdir -p /tmp/su-plain
mount -t ext4 "$PLAIN_DEV" /tmp/su-plain
cp "$PAYLOAD/data.bin" /tmp/su-plain/data.bin
note dirty_kb "$(bdi_stat "$PLAIN_DEV" BdiReclaimable)"
hostdev_xml "$PLAIN_BUSDEV" >/tmp/plain-hostdev.xml
virsh attach-device g1 /tmp/plain-hostdev.xml --live >"$OUT/attach.out" 2>&1
note attach_rc $?
sleep 3
timeout 30 sync
