#!/bin/bash
# Benchmark: `virsh attach-device --live` of an idle stick into g1, without and with the
# gate (safeusb protect). Between rounds the stick is detached and given back.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
hostdev_xml "$IDLE_BUSDEV" >/tmp/idle-hostdev.xml
# libvirt's own account of each monitor command (sent, reply received; its clock, in ms),
# set at run time, qemu.conf and libvirtd.conf untouched: what the gate adds to an attach
# is the difference of device_add's round trips, free of libvirt's other work.
MONLOG=/run/libvirt/safeusb-bench-monitor.log
virt-admin daemon-log-filters "1:qemu.qemu_monitor" >"$OUT/virt-admin.log" 2>&1
virt-admin daemon-log-outputs "1:file:$MONLOG 3:stderr" >>"$OUT/virt-admin.log" 2>&1
round() {  # LABEL
    for i in 1 2 3 4 5 6 7; do
        s=$(date +%s.%N)
        virsh attach-device g1 /tmp/idle-hostdev.xml --live >>"$OUT/$1.log" 2>&1 || echo "attach failed" >>"$OUT/$1.log"
        e=$(date +%s.%N)
        echo "$1 $(echo "$e - $s" | bc)" >>"$OUT/times"
        echo "$1 $s $e" >>"$OUT/spans"
        virsh detach-device g1 /tmp/idle-hostdev.xml --live >>"$OUT/$1.log" 2>&1
        sleep 1
        "$SAFEUSB" release "$IDLE_USB" >>"$OUT/$1.log" 2>&1
        sleep 1
    done
}
round direct
"$SAFEUSB" protect g1 >>"$OUT/gate.log" 2>&1
virsh destroy g1 >/dev/null 2>&1
virsh start --paused g1 >>"$OUT/gate.log" 2>&1
note emulator "$(emulator_of)"
round gate
gate_log >>"$OUT/gate.log"
cp "$MONLOG" "$OUT/monitor.log" 2>/dev/null || true
