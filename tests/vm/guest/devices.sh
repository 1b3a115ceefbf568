#!/bin/bash
# Which emulated USB devices the guest kernel sees, with their interface drivers,
# as lines "SYSNAME VENDOR:PRODUCT DRIVER[,DRIVER...]" in $OUT/usb.
. "$GUEST_LIB"
sleep 2
for d in /sys/bus/usb/devices/*; do
    [ -e "$d/idVendor" ] || continue
    drivers=$(for i in "$d"/"$(basename "$d")":*; do
                  [ -L "$i/driver" ] && basename "$(readlink "$i/driver")"
              done | sort -u | paste -sd, -)
    echo "$(basename "$d") $(cat "$d/idVendor"):$(cat "$d/idProduct") ${drivers:--}"
done | tee "$OUT/usb"
ls /dev/ttyUSB* 2>/dev/null | tee "$OUT/ttyusb"
ls /sys/class/net | tee "$OUT/net"
