#!/bin/bash
# usb-tablet (0627:0001, absolute pointer): beside QEMU's PS/2 mouse it is not the last
# pointing device; with psmouse unbound from serio, it is.
. "$GUEST_LIB"
. "$GUEST_DIR/classes-lib.sh"
usb=$(usb_of 0627:0001 "QEMU USB Tablet") || exit 1
note usb "$usb"
input_of "$usb" || exit 1
input_facts inputs
inspect other "$usb" --json
unbind_serio psmouse
input_facts inputs-after
inspect last "$usb" --json
