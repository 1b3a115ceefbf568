#!/bin/bash
# One idle stick (msdos table, two ext4 partitions), named every way a selector can.
. "$GUEST_LIB"
partition "$SEL_DEV" 1 >/dev/null || exit 1
bus=${SEL_BUSDEV%%:*}
dev=${SEL_BUSDEV##*:}
note usb "$SEL_USB"
inspect sysfs "$SEL_USB" --json
inspect busdev "$bus:$dev" --json
inspect busdev-padded "$(printf '%03d:%03d' "$bus" "$dev")" --json
inspect vidpid 46f4:0001 --json
inspect disk "$SEL_DEV" --json
inspect partition "${SEL_DEV}1" --json
usbnode=$(printf '/dev/bus/usb/%03d/%03d' "$bus" "$dev")
if [ -e "$usbnode" ]; then
    inspect usbnode "$usbnode" --json
else
    note usbnode absent
fi
inspect xml-vidpid --xml "$GUEST_DIR/hostdev-stick.xml" --json
cat >/tmp/hostdev-address.xml <<XML
<hostdev mode='subsystem' type='usb'>
  <source><address bus='$bus' device='$dev'/></source>
</hostdev>
XML
inspect xml-address --xml /tmp/hostdev-address.xml --json
inspect text "$SEL_USB"
