#!/bin/bash
# (f) Under protect_new_domains = true, g2 defined now (after safeusbd started) is
# protected without a command; at its first hotplug a mounted stick with 4 MiB unwritten
# (writes throttled, so they stay unwritten) is refused under mount = "refuse" for g2,
# the stick left mounted with its data.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
. "$GUEST_DIR/events-lib.sh"
printf '[defaults]\nmount = "unmount"\nrestore = true\n\n[[rules]]\nname = "first hotplug"\nport = "%s"\nmount = "refuse"\n\n[service]\nprotect_new_domains = true\n' \
    "$LATE_USB" >/etc/safeusb/policy.toml
sed -e 's|<name>g1</name>|<name>g2</name>|' "$LAB_DIR/g1.xml" >/tmp/g2.xml
run_step define virsh define /tmp/g2.xml
protected=0
for _ in $(seq 1 150); do
    virsh dumpxml --inactive g2 | grep -q "<emulator>$LAUNCHER</emulator>" && { protected=1; break; }
    sleep 0.2
done
note protected "$protected"
note inactive_emulator "$(virsh dumpxml --inactive g2 | sed -n 's|.*<emulator>\(.*\)</emulator>.*|\1|p')"
run_step start virsh start --paused g2
note state "$(virsh domstate g2)"
note live_emulator "$(virsh dumpxml g2 | sed -n 's|.*<emulator>\(.*\)</emulator>.*|\1|p')"
mp=/tmp/su-late
mkdir -p "$mp"
mount -t ext4 "$LATE_DEV" "$mp"
cp "$PAYLOAD/data.bin" "$mp/data.bin"
note unwritten_kb "$(unwritten_kb "$LATE_DEV")"
hostdev_xml "$LATE_BUSDEV" >/tmp/su-late-hostdev.xml
virsh attach-device g2 /tmp/su-late-hostdev.xml --live >"$OUT/attach.out" 2>&1
note attach_rc $?
note mounted_after "$(mounted "$mp")"
note unwritten_kb_after "$(unwritten_kb "$LATE_DEV")"
note in_domain "$(virsh dumpxml g2 | grep -c "<hostdev mode='subsystem' type='usb'")"
grep -F "safeusb-qemu-gate[" /var/log/libvirt/qemu/g2.log >"$OUT/gate.log" 2>/dev/null
cp /var/log/libvirt/qemu/g2.log "$OUT/g2.log" 2>/dev/null
daemon_log >"$OUT/safeusbd.log"
