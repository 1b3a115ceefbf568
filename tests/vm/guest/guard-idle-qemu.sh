#!/bin/bash
# The guard on, the stick idle (nothing mounted or open): QEMU started directly with
# -device usb-host,hostbus=,hostaddr= is refused the stick (it goes on with a dead
# device); safeusbd prepares the stick by the policy (holds it, unbinds usb-storage) while
# that QEMU still runs; QEMU is stopped and started again the same way. QEMU claims the
# stick's interface (usbfs) when its guest sets the device's configuration: the second
# runs its firmware (SeaBIOS enumerates USB disks to boot from); the first stays paused
# (-S), so that it does not ask again by itself. Once the second QEMU is stopped,
# safeusbd gives the stick back.
. "$GUEST_DIR/guard-lib.sh"
guard_on
intf=$(storage_intf "$IDLE_QEMU_USB")
note intf "$intf"
note port "$IDLE_QEMU_USB"
launch() {  # launch TAG [-S]: start QEMU and let it open the stick; notes what it got
    local qmp="/tmp/g-idle-$1.qmp" i
    qemu-system-x86_64 -machine pc,accel=tcg -m 64 -nodefaults -display none ${2:-} \
        -qmp "unix:$qmp,server=on,wait=off" -device qemu-xhci,id=x \
        -device "usb-host,bus=x.0,id=stick,hostbus=${IDLE_QEMU_BUSDEV%%:*},hostaddr=${IDLE_QEMU_BUSDEV##*:}" \
        >"$OUT/$1.out" 2>"$OUT/$1.err" &
    qemu=$!
    # QEMU opens the device as it starts (slowly, nested under TCG); then a few seconds more
    for i in $(seq 1 120); do
        ls -l "/proc/$qemu/fd" 2>/dev/null | grep -q /dev/bus/usb && break
        sleep 0.5
    done
    sleep 3
    # a running guest: until its firmware configured the stick (QEMU claims it), 150 s
    [ -z "${2:-}" ] && for i in $(seq 1 300); do
        [ "$(driver_of "$intf")" = usbfs ] && break
        sleep 0.5
    done
    note "$1_running" "$(kill -0 $qemu 2>/dev/null && echo 1 || echo 0)"
    note "$1_fds" "$(ls -l "/proc/$qemu/fd" 2>/dev/null | grep -c /dev/bus/usb)"
    note "$1_driver" "$(driver_of "$intf")"
    # what QEMU's guest has on its USB bus
    qmp_hmp "$qmp" "info usb" >"$OUT/$1-info-usb.out" 2>&1
    echo "qemu $1: $(head -c 300 "$OUT/$1.err") info usb: $(cat "$OUT/$1-info-usb.out")"
}
stop() {  # stop TAG: QEMU quits; the driver of the interface after it
    kill $qemu 2>/dev/null
    wait $qemu 2>/dev/null
    note "$1_driver_after" "$(driver_of "$intf")"
}
launch first -S
wait_prepared "$IDLE_QEMU_USB" "$intf"
stop first
# safeusbd follows the handed-over stick: the refused QEMU closing it must not give it
# back (it would within its follow-ups and RECHECK_HELD, 15 s)
sleep 20
note driver_before_second "$(driver_of "$intf")"
note record_before_second "$([ -e "/run/safeusb/$IDLE_QEMU_USB.json" ] && echo 1 || echo 0)"
launch second
# safeusbd sees the second QEMU's claim (at a uevent, or its scan every 15 s at the latest)
logged() {  # logged TEXT SECONDS: until safeusbd's log has TEXT; notes nothing
    local i
    for i in $(seq 1 $((${2} * 5))); do
        grep -qF "$1" "$SHARE/out/safeusbd.log" && return 0
        sleep 0.2
    done
    return 1
}
logged "safeusbd: $IDLE_QEMU_USB is taken by its guest" 60
note taken $?
stop second
# that QEMU let go: safeusbd gives the stick back by its record (usb-storage bound again)
logged "safeusbd: $IDLE_QEMU_USB: given back to the host" 90
note given_back $?
for _ in $(seq 1 50); do
    [ "$(driver_of "$intf")" = usb-storage ] && break
    sleep 0.2
done
note driver_given_back "$(driver_of "$intf")"
note record_given_back "$([ -e "/run/safeusb/$IDLE_QEMU_USB.json" ] && echo 1 || echo 0)"
# what safeusbd made of it: the refusal, the prepare, QEMU's repeated usbfs CONNECTs
# (logged once, then counted) and `safeusb status`
sleep 10
"$SAFEUSB" status >"$OUT/status.out" 2>&1
"$SAFEUSB" guard status --json >"$OUT/guard-status.json" 2>&1
grep "$IDLE_QEMU_USB" "$SHARE/out/safeusbd.log" >"$OUT/log.out"
cat "$OUT/log.out"
