#!/bin/bash
# usb-serial (FTDI 0403:6001, ftdi_sio): idle, then /dev/ttyUSB0 held open by a process.
. "$GUEST_LIB"
. "$GUEST_DIR/classes-lib.sh"
usb=$(usb_of 0403:6001) || exit 1
note usb "$usb"
wait_for /dev/ttyUSB0 30 || exit 1
ls -l "/sys/bus/usb/devices/$usb:1.0/driver" || true
note driver "$(basename "$(readlink "/sys/bus/usb/devices/$usb:1.0/driver")")"
inspect idle "$usb" --json
inspect idle-vidpid 0403:6001 --json
sleep 600 </dev/ttyUSB0 &
note pid $!
sleep 0.5
inspect held "$usb" --json
inspect held-text "$usb"
