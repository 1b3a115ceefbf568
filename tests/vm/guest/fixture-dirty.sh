#!/bin/bash
# ext4 mounted at /tmp/stick with 4 MiB written and still dirty.
. "$GUEST_LIB"
mkdir -p /tmp/stick
mount -t ext4 "$STICK_DEV" /tmp/stick
cp "$PAYLOAD/data.bin" /tmp/stick/data.bin
note dirty_kb "$(bdi_stat "$STICK_DEV" BdiReclaimable)"
record_fixture
