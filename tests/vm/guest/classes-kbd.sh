#!/bin/bash
# usb-kbd (0627:0001, usbhid): beside QEMU's PS/2 keyboard it is not the last keyboard;
# an event node of it held open; the PS/2 keyboard inhibited; then, with atkbd unbound
# from serio, the only keyboard.
. "$GUEST_LIB"
. "$GUEST_DIR/classes-lib.sh"
usb=$(usb_of 0627:0001 "QEMU USB Keyboard") || exit 1
note usb "$usb"
input=$(input_of "$usb") || exit 1
input_facts inputs
ls /sys/bus/serio/devices/ /sys/bus/serio/drivers/
inspect other "$usb" --json

ev=$(ls "/sys/class/input/$input" | grep '^event' | head -1)
note event "$ev"
wait_for "/dev/input/$ev" 10 || exit 1
sleep 600 <"/dev/input/$ev" &
pid=$!
note pid $pid
sleep 0.5
inspect held "$usb" --json
kill $pid

ps2=$(basename "$(readlink -f /sys/bus/serio/devices/serio0/input/input*)")
note ps2 "$ps2"
if [ -e "/sys/class/input/$ps2/inhibited" ]; then
    echo 1 > "/sys/class/input/$ps2/inhibited"
    note inhibited "$(cat "/sys/class/input/$ps2/inhibited")"
    inspect inhibited "$usb" --json
    echo 0 > "/sys/class/input/$ps2/inhibited"
    inspect uninhibited "$usb" --json
fi

unbind_serio atkbd
input_facts inputs-after
inspect last "$usb" --json
inspect last-text "$usb"
