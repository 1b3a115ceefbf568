#!/bin/bash
# /etc/safeusb/policy.toml says mount = "unmount": the same plain live attach of another
# mounted, dirty stick succeeds after the gate's prepare flushed, unmounted and unbound it.
# Other monitor traffic passes: a USB keyboard attach, query-status, HMP `info usb`.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
mkdir -p /etc/safeusb
printf '[defaults]\nmount = "unmount"\n' >/etc/safeusb/policy.toml
mp=/tmp/su-give
mkdir -p "$mp"
mount -t ext4 "$GIVE_DEV" "$mp"
cp "$PAYLOAD/data.bin" "$mp/data.bin"
note dirty_kb "$(bdi_stat "$GIVE_DEV" BdiReclaimable)"
hostdev_xml "$GIVE_BUSDEV" >/tmp/su-give-hostdev.xml
start=$(date +%s.%N)
virsh attach-device g1 /tmp/su-give-hostdev.xml --live >"$OUT/attach.out" 2>&1
note attach_rc $?
note attach_seconds "$(echo "$(date +%s.%N) - $start" | bc)"
cat "$OUT/attach.out"
note mounted_after "$(mounted "$mp")"
note disk_after "$(present "$GIVE_DEV")"
note driver_after "$(basename "$(readlink "/sys/bus/usb/devices/$GIVE_USB:1.0/driver" 2>/dev/null)" 2>/dev/null)"
note in_domain "$(usb_hostdevs)"
note state "$(virsh domstate g1)"
printf "<input type='keyboard' bus='usb'/>\n" >/tmp/su-kbd.xml
run_step kbd virsh attach-device g1 /tmp/su-kbd.xml --live
note keyboards "$(virsh dumpxml g1 | grep -c "<input type='keyboard' bus='usb'")"
run_step status virsh qemu-monitor-command g1 '{"execute":"query-status"}'
run_step info_usb virsh qemu-monitor-command g1 --hmp 'info usb'
# The device QEMU opened is the one the gate checked: libvirt's attach (an fd set), then,
# after a detach, an HMP device_add naming the stick by a hexadecimal bus and an octal
# address.
qemu=$(qemu_pid)
note give_node "$(usb_node "$GIVE_BUSDEV")"
note qemu_usb_fds "$(qemu_usb_fds "$qemu")"
run_step detach virsh detach-device g1 /tmp/su-give-hostdev.xml --live
for _ in $(seq 1 100); do [ -z "$(qemu_usb_fds "$qemu")" ] && break; sleep 0.1; done
note qemu_usb_fds_detached "$(qemu_usb_fds "$qemu")"
bus=${GIVE_BUSDEV%%:*}
dev=${GIVE_BUSDEV##*:}
note hmp_bus_text "0x$(printf %x "$bus")"
note hmp_addr_text "0$(printf %o "$dev")"
run_step hmp_add virsh qemu-monitor-command g1 --hmp \
    "device_add usb-host,hostbus=0x$(printf %x "$bus"),hostaddr=0$(printf %o "$dev"),id=q2"
note qemu_usb_fds_hmp "$(qemu_usb_fds "$qemu")"
run_step info_usb_hmp virsh qemu-monitor-command g1 --hmp 'info usb'
note state_after_hmp "$(virsh domstate g1)"
gate_log >"$OUT/gate.log"
