#!/bin/bash
# safeusb demo, with safeusb: the same handover through `safeusb attach-device`, first
# under the built-in policy (refused), then with mount = "unmount" (flushed, unmounted).
. "$GUEST_LIB"
mkdir -p /tmp/su-guarded
mount -t ext4 "$GUARDED_DEV" /tmp/su-guarded
cp "$PAYLOAD/data.bin" /tmp/su-guarded/data.bin
note dirty_kb "$(bdi_stat "$GUARDED_DEV" BdiReclaimable)"
hostdev_xml "$GUARDED_BUSDEV" >/tmp/guarded-hostdev.xml
note in_domain_before "$(virsh dumpxml g1 | grep -c "<hostdev mode='subsystem' type='usb'")"
"$SAFEUSB" attach-device g1 /tmp/guarded-hostdev.xml --live >"$OUT/refused.out" 2>&1
note refused_rc $?
"$SAFEUSB" status >"$OUT/status.out" 2>&1
"$SAFEUSB" status --json >"$OUT/status.json" 2>"$OUT/status.err"
note status_rc $?
note mounted_after_refusal "$(awk '$5 == "/tmp/su-guarded"' /proc/self/mountinfo | wc -l)"
mkdir -p /etc/safeusb
printf '[defaults]\nmount = "unmount"\n' >/etc/safeusb/policy.toml
"$SAFEUSB" attach-device g1 /tmp/guarded-hostdev.xml --live >"$OUT/attach.out" 2>&1
note attach_rc $?
sleep 3
timeout 30 sync
note mounted_after "$(awk '$5 == "/tmp/su-guarded"' /proc/self/mountinfo | wc -l)"
note in_domain "$(virsh dumpxml g1 | grep -c "<hostdev mode='subsystem' type='usb'")"
