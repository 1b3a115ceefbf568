#!/bin/bash
# A USB device that presents only a CD-ROM drive (QEMU usb-storage, empty CD drive), as a
# modem in its "driver CD" mode does: with the usb_modeswitch database installed (this
# machine's) and with it hidden in a private mount namespace.
. "$GUEST_LIB"
. "$GUEST_DIR/classes-lib.sh"
usb=$(usb_of 46f4:0001) || exit 1
note usb "$usb"
for i in $(seq 1 150); do
    sr=$(ls "/sys/bus/usb/devices/$usb:1.0"/host*/target*/*/block 2>/dev/null | head -1)
    [ -n "$sr" ] && break
    sleep 0.2
done
note sr "$sr"
[ -n "$sr" ] || { echo "no CD-ROM drive under $usb" >&2; exit 1; }
note db "$(ls /usr/share/usb_modeswitch/ /usr/lib/udev/rules.d/ | grep -c -i modeswitch)"
inspect db "$usb" --json
unshare -m --propagation private bash -c '
    . "$GUEST_LIB"
    mount -t tmpfs none /usr/share/usb_modeswitch || exit 1
    mount -t tmpfs none /usr/lib/udev/rules.d || exit 1
    ls /usr/share/usb_modeswitch /usr/lib/udev/rules.d /etc/usb_modeswitch.d /etc/udev/rules.d
    inspect nodb "$1" --json
' _ "$usb"
