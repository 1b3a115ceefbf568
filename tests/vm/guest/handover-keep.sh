#!/bin/bash
# Mounted ext4 with 4 MiB dirty and the built-in policy: prepare refuses and changes nothing.
. "$GUEST_LIB"
. "$GUEST_DIR/handover-lib.sh"
mkdir -p /tmp/keep
mount -t ext4 "$KEEP_DEV" /tmp/keep
cp "$PAYLOAD/data.bin" /tmp/keep/data.bin
note dirty_kb "$(bdi_stat "$KEEP_DEV" BdiReclaimable)"
run_safeusb prepare prepare "$KEEP_USB"
note mounted_after "$(mounted /tmp/keep)"
note disk_after "$(present "$KEEP_DEV")"
note dirty_kb_after "$(bdi_stat "$KEEP_DEV" BdiReclaimable)"
