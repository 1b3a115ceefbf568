#!/bin/bash
# The built-in policy (no /etc/safeusb/policy.toml): a plain `virsh attach-device --live` of
# the mounted stick with 4 MiB dirty is refused by the gate, naming the mountpoint; the
# stick stays mounted with its data still in the page cache, the domain keeps running.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
rm -f /etc/safeusb/policy.toml
mp=/tmp/su-refuse
mkdir -p "$mp"
mount -t ext4 "$REFUSE_DEV" "$mp"
cp "$PAYLOAD/data.bin" "$mp/data.bin"
note dirty_kb "$(bdi_stat "$REFUSE_DEV" BdiReclaimable)"
hostdev_xml "$REFUSE_BUSDEV" >/tmp/su-refuse-hostdev.xml
start=$(date +%s.%N)
virsh attach-device g1 /tmp/su-refuse-hostdev.xml --live >"$OUT/attach.out" 2>&1
note attach_rc $?
note attach_seconds "$(echo "$(date +%s.%N) - $start" | bc)"
cat "$OUT/attach.out"
note mounted_after "$(mounted "$mp")"
note disk_after "$(present "$REFUSE_DEV")"
note dirty_kb_after "$(bdi_stat "$REFUSE_DEV" BdiReclaimable)"
note in_domain "$(usb_hostdevs)"
note state "$(virsh domstate g1)"
note records "$(find /run/safeusb -name '*.json' 2>/dev/null | wc -l)"
gate_log >"$OUT/gate.log"
