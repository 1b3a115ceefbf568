#!/bin/bash
# msdos table with two ext4 partitions, the first one mounted.
. "$GUEST_LIB"
p1=$(partition "$PARTS_DEV" 1) || exit 1
partition "$PARTS_DEV" 2 >/dev/null || exit 1
mkdir -p /tmp/parts1
mount -t ext4 "$p1" /tmp/parts1
note mounted "$p1"
inspect parts "$PARTS_USB" --json
# The unmounted partition's node names the same USB device, still in use.
inspect parts-node "${PARTS_DEV}2" --json
