#!/bin/bash
# A flush that cannot finish in time (the drive is throttled in QEMU): prepare refuses,
# nothing is unmounted, nothing is lost.
. "$GUEST_LIB"
. "$GUEST_DIR/handover-lib.sh"
mkdir -p /tmp/su-slow
mount -t ext4 "$SLOW_DEV" /tmp/su-slow
cp "$PAYLOAD/data.bin" /tmp/su-slow/data.bin
note dirty_kb "$(bdi_stat "$SLOW_DEV" BdiReclaimable)"
run_safeusb prepare prepare "$SLOW_USB" --policy "$unmount_policy" --timeout 2 --json
note mounted_after "$(mounted /tmp/su-slow)"
note disk_after "$(present "$SLOW_DEV")"
