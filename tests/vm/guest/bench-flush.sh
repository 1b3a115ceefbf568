#!/bin/bash
# Flush benchmark: a stick whose drive QEMU throttles for writes; for each size, mount,
# write that much (left dirty), prepare (flush, unmount, hand over), release.
. "$GUEST_LIB"
printf '[defaults]\nmount = "unmount"\nflush_timeout = 600\n' >/tmp/bench-policy.toml
mkdir -p /tmp/su-bench
for mib in 2 4 8; do
    mount -t ext4 "$SLOW_DEV" /tmp/su-bench
    head -c "$((mib * 1048576))" "$PAYLOAD/data.bin" >/tmp/su-bench/f$mib
    dirty=$(bdi_stat "$SLOW_DEV" BdiReclaimable)
    "$SAFEUSB" prepare "$SLOW_USB" --policy /tmp/bench-policy.toml --json >"$OUT/prepare-$mib.json" 2>"$OUT/prepare-$mib.err"
    echo "$mib $dirty $?" >>"$OUT/rounds"
    "$SAFEUSB" release "$SLOW_USB" --policy /tmp/bench-policy.toml --json >"$OUT/release-$mib.json" 2>&1
    SLOW_DEV=/dev/$(basename "$(ls -d /sys/bus/usb/devices/$SLOW_USB/*/host*/target*/*/block/* | head -1)")
    umount /tmp/su-bench 2>/dev/null
done
