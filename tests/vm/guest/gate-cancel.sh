#!/bin/bash
# A decision that outlasts the gate's 30 s deadline: the stick is throttled in QEMU so its
# flush takes about a minute. The gate cancels prepare, which stops the flush and undoes
# what it did; only then is libvirt told no. The stick stays mounted, nothing is recorded
# as taken, and its data reaches it in the end (checked from outside).
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
mkdir -p /etc/safeusb
printf '[defaults]\nmount = "unmount"\n' >/etc/safeusb/policy.toml
mp=/tmp/su-cancel
mkdir -p "$mp"
mount -t ext4 "$SLOW_DEV" "$mp"
cp "$PAYLOAD/data.bin" "$mp/data.bin"
note dirty_kb "$(bdi_stat "$SLOW_DEV" BdiReclaimable)"
note in_domain_before "$(usb_hostdevs)"
hostdev_xml "$SLOW_BUSDEV" >/tmp/su-cancel-hostdev.xml
start=$(date +%s.%N)
virsh attach-device g1 /tmp/su-cancel-hostdev.xml --live >"$OUT/attach.out" 2>&1
note attach_rc $?
note attach_seconds "$(echo "$(date +%s.%N) - $start" | bc)"
cat "$OUT/attach.out"
note mounted_after "$(mounted "$mp")"
note disk_after "$(present "$SLOW_DEV")"
note driver_after "$(basename "$(readlink "/sys/bus/usb/devices/$SLOW_USB:1.0/driver" 2>/dev/null)" 2>/dev/null)"
note record_after "$(ls "/run/safeusb/$SLOW_USB.json" 2>/dev/null | wc -l)"
note in_domain_after "$(usb_hostdevs)"
note state "$(virsh domstate g1)"
gate_log >"$OUT/gate.log"
