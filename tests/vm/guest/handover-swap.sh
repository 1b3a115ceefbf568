#!/bin/bash
# Swap on the whole stick: prepare turns it off and unbinds; release turns it back on.
. "$GUEST_LIB"
. "$GUEST_DIR/handover-lib.sh"
mkswap -q "$SWAP_DEV" >/dev/null
swapon "$SWAP_DEV"
note swaps_before "$(grep -c "^$SWAP_DEV " /proc/swaps)"
run_safeusb prepare prepare "$SWAP_USB" --policy "$unmount_policy" --json
note swaps_after "$(grep -c "^/dev/" /proc/swaps)"
note disk_after "$(present "$SWAP_DEV")"
run_safeusb release release "$SWAP_USB" --policy "$unmount_policy" --json
note swaps_after_release "$(grep -c "^/dev/" /proc/swaps)"
