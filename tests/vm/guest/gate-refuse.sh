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
note refuse_busdev "$REFUSE_BUSDEV"
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
# The same stick asked for over HMP: a quoted argument (QEMU strips the quotes) and a
# hexadecimal bus with an octal address (QEMU reads both as C does). The gate must read
# the same stick, and refuse it naming the mountpoint; QEMU must not open it.
bus=${REFUSE_BUSDEV%%:*}
dev=${REFUSE_BUSDEV##*:}
run_step hmp_quoted virsh qemu-monitor-command g1 --hmp \
    "device_add \"usb-host,hostbus=$bus,hostaddr=$dev,id=q1\""
run_step hmp_octal virsh qemu-monitor-command g1 --hmp \
    "device_add usb-host,hostbus=0x$(printf %x "$bus"),hostaddr=0$(printf %o "$dev"),id=q2"
note mounted_after_hmp "$(mounted "$mp")"
note dirty_kb_after_hmp "$(bdi_stat "$REFUSE_DEV" BdiReclaimable)"
note qemu_usb_fds_after_hmp "$(qemu_usb_fds "$(qemu_pid)")"
run_step info_usb virsh qemu-monitor-command g1 --hmp 'info usb'
note state_after_hmp "$(virsh domstate g1)"
gate_log >"$OUT/gate.log"
