#!/bin/bash
# Without safeusb: a mounted ext4 stick with 4 MiB dirty is attached live to the
# nested domain. Expected: virsh reports success and the data never reaches the disk.
. "$GUEST_LIB"
mkdir -p /tmp/stick
mount -t ext4 "$STICK_DEV" /tmp/stick
cp "$PAYLOAD/base.bin" /tmp/stick/base.bin
sync
cp "$PAYLOAD/data.bin" /tmp/stick/data.bin
note dirty_kb "$(bdi_stat "$STICK_DEV" BdiReclaimable)"
hostdev_xml "$STICK_BUSDEV" >/tmp/hostdev.xml
virsh attach-device g1 /tmp/hostdev.xml --live >"$OUT/attach.out" 2>&1
note attach_rc $?
cat "$OUT/attach.out"
# Let the kernel notice; a sync now can only fail to write.
sleep 3
timeout 30 sync
note sync_rc $?
note in_domain "$(virsh dumpxml g1 | grep -c "<hostdev mode='subsystem' type='usb'")"
