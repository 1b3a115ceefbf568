#!/bin/bash
# The guard on, libvirt as Debian ships it: the stick idle (a file written on it and
# unmounted, nothing open): `virsh attach-device --live` into g1, a domain safeusb does not
# protect, is refused in the kernel (QEMU goes on with a dead device and libvirt may say
# success); safeusbd prepares the stick by the policy; the dead device is detached and the
# stick attached again. g1 then runs (it was started paused): QEMU claims the stick's
# interface (usbfs) when its firmware, SeaBIOS, sets the device's configuration.
. "$GUEST_DIR/guard-lib.sh"
guard_on
intf=$(storage_intf "$IDLE_LV_USB")
note intf "$intf"
note port "$IDLE_LV_USB"
mkdir -p /tmp/g-idle-lv
mount -t ext4 "$IDLE_LV_DEV" /tmp/g-idle-lv
cp "$PAYLOAD/data.bin" /tmp/g-idle-lv/data.bin
umount /tmp/g-idle-lv
hostdev_xml "$IDLE_LV_BUSDEV" >"$OUT/hostdev.xml"
qpid=$(cat /run/libvirt/qemu/g1.pid 2>/dev/null)
note qemu_pid "$qpid"
virsh_() {  # virsh_ TAG ARGS...: virsh on the system connection, its exit code noted
    local tag=$1
    shift
    timeout 300 virsh -c qemu:///system "$@" >"$OUT/$tag.out" 2>"$OUT/$tag.err"
    note "${tag}_rc" $?
}
usb_state() {  # usb_state TAG: who has the stick: driver, g1's QEMU's fds, g1's USB bus
    note "$1_driver" "$(driver_of "$intf")"
    note "$1_qemu_fds" "$(ls -l "/proc/$qpid/fd" 2>/dev/null | grep -c /dev/bus/usb)"
    timeout 60 virsh -c qemu:///system qemu-monitor-command g1 --hmp "info usb" \
        >"$OUT/$1-info-usb.out" 2>&1
    timeout 60 virsh -c qemu:///system dumpxml g1 >"$OUT/$1-g1.xml" 2>&1
}
virsh_ first attach-device g1 "$OUT/hostdev.xml" --live
usb_state first
wait_prepared "$IDLE_LV_USB" "$intf"
virsh_ detach detach-device g1 "$OUT/hostdev.xml" --live
# safeusbd follows the handed-over stick: g1's QEMU closing the dead device must not give
# it back (it would within its follow-ups and RECHECK_HELD, 15 s)
sleep 20
usb_state detached
note record_before_second "$([ -e "/run/safeusb/$IDLE_LV_USB.json" ] && echo 1 || echo 0)"
virsh_ second attach-device g1 "$OUT/hostdev.xml" --live
virsh_ resume resume g1
# until g1's firmware configured the stick (QEMU claims it), at most 150 s
for _ in $(seq 1 300); do
    [ "$(driver_of "$intf")" = usbfs ] && break
    sleep 0.5
done
usb_state second
virsh_ suspend suspend g1
sleep 10
"$SAFEUSB" status >"$OUT/status.out" 2>&1
"$SAFEUSB" guard status --json >"$OUT/guard-status.json" 2>&1
grep "$IDLE_LV_USB\|$intf" "$SHARE/out/safeusbd.log" >"$OUT/log.out"
cat "$OUT/log.out"
