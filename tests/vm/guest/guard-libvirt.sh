#!/bin/bash
# The guard on, libvirt as Debian ships it (QEMU as libvirt-qemu under AppArmor):
# `virsh attach-device --live` of a mounted stick with 4 MiB unwritten into g1, a domain
# safeusb does not protect.
. "$GUEST_DIR/guard-lib.sh"
guard_on
intf=$(storage_intf "$LV_USB")
note intf "$intf"
note port "$LV_USB"
mount_dirty "$LV_DEV" /tmp/g-lv
hostdev_xml "$LV_BUSDEV" >"$OUT/hostdev.xml"
qpid=$(cat /run/libvirt/qemu/g1.pid 2>/dev/null)
note qemu_pid "$qpid"
note qemu_uid "$(awk '/^Uid:/ {print $2}' "/proc/$qpid/status" 2>/dev/null)"
note qemu_label "$(cat "/proc/$qpid/attr/current" 2>/dev/null)"
timeout 300 virsh -c qemu:///system attach-device g1 "$OUT/hostdev.xml" --live \
    >"$OUT/attach.out" 2>"$OUT/attach.err"
note attach_rc $?
# safeusbd logs the refusal, then inspect's reason (an inspect under TCG takes a while)
for _ in $(seq 1 300); do
    grep -q "guard: .*: $LV_USB stays with the host" "$SHARE/out/safeusbd.log" 2>/dev/null && break
    sleep 0.5
done
note qemu_usb_fds "$(ls -l "/proc/$qpid/fd" 2>/dev/null | grep -c /dev/bus/usb)"
timeout 60 virsh -c qemu:///system dumpxml g1 >"$OUT/g1.xml" 2>&1
"$SAFEUSB" status >"$OUT/status.out" 2>&1
"$SAFEUSB" guard status >"$OUT/guard-status-after.out" 2>&1
cp /run/safeusb/guard-refusals "$OUT/guard-refusals.json" 2>/dev/null
after "$LV_DEV" /tmp/g-lv "$LV_USB" "$intf"
