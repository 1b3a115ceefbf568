#!/bin/bash
# The guard on: QEMU started directly with -device usb-host,hostbus=,hostaddr= for a mounted
# stick with 4 MiB unwritten.
. "$GUEST_DIR/guard-lib.sh"
guard_on
intf=$(storage_intf "$QEMU_USB")
mount_dirty "$QEMU_DEV" /tmp/g-qemu
qemu-system-x86_64 -machine pc,accel=tcg -m 64 -nodefaults -display none -S \
    -device qemu-xhci,id=x -device "usb-host,bus=x.0,hostbus=${QEMU_BUSDEV%%:*},hostaddr=${QEMU_BUSDEV##*:}" \
    >"$OUT/qemu.out" 2>"$OUT/qemu.err" &
pid=$!
# QEMU opens the device as it starts (slowly, nested under TCG); then a few seconds more
for i in $(seq 1 120); do
    ls -l /proc/$pid/fd 2>/dev/null | grep -q /dev/bus/usb && break
    sleep 0.5
done
sleep 3
note qemu_running "$(kill -0 $pid 2>/dev/null && echo 1 || echo 0)"
note qemu_fds "$(ls -l /proc/$pid/fd 2>/dev/null | grep -c /dev/bus/usb)"
kill $pid 2>/dev/null
wait $pid 2>/dev/null
after "$QEMU_DEV" /tmp/g-qemu "$QEMU_USB" "$intf"
