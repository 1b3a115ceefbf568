#!/bin/bash
# ext4 mounted with 4 MiB written and left dirty (writeback is off in the guest).
. "$GUEST_LIB"
mkdir -p /tmp/dirty
mount -t ext4 "$DIRTY_DEV" /tmp/dirty
sync
cp "$PAYLOAD/data.bin" /tmp/dirty/data.bin
note dirty_kb "$(bdi_stat "$DIRTY_DEV" BdiReclaimable)"
inspect dirty "$DIRTY_BUSDEV" --json
