#!/bin/bash
# usb-kbd (0627:0001, usbhid): beside QEMU's PS/2 keyboard it is not the last keyboard;
# an event node of it held open; then, with atkbd unbound from serio, the only keyboard.
. "$GUEST_LIB"
. "$GUEST_DIR/classes-lib.sh"
usb=$(usb_of 0627:0001) || exit 1
note usb "$usb"
for i in $(seq 1 50); do
    ls -d /sys/bus/usb/devices/"$usb":1.0/*/input/input* >/dev/null 2>&1 && break
    sleep 0.2
done
input_facts inputs
ls /sys/bus/serio/devices/ /sys/bus/serio/drivers/ 2>&1
inspect other "$usb" --json

ev=$(ls -d /sys/bus/usb/devices/"$usb":1.0/*/input/input*/event* 2>/dev/null | head -1)
ev=${ev##*/}
note event "$ev"
if [ -n "$ev" ]; then
    wait_for "/dev/input/$ev" 10
    sleep 600 <"/dev/input/$ev" &
    note pid $!
    sleep 0.5
    inspect held "$usb" --json
    kill %1
    wait
fi

for s in /sys/bus/serio/drivers/atkbd/serio*; do
    [ -e "$s" ] || continue
    echo "unbinding atkbd from ${s##*/}"
    echo "${s##*/}" > /sys/bus/serio/drivers/atkbd/unbind
done
input_facts inputs-after
inspect last "$usb" --json
inspect last-text "$usb"
