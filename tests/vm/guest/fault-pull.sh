#!/bin/bash
# The stick is pulled out while prepare is flushing it: prepare stops at once, says the
# device left and how much had not been written, and does not claim success. A file
# synced before stays intact (checked from outside).
. "$GUEST_LIB"
. "$GUEST_DIR/handover-lib.sh"
mkdir -p /tmp/su-pulled
mount -t ext4 "$PULLED_DEV" /tmp/su-pulled
cp "$PAYLOAD/before.bin" /tmp/su-pulled/before.bin
sync -f /tmp/su-pulled
cp "$PAYLOAD/data.bin" /tmp/su-pulled/data.bin
unwritten() { echo $(( $(bdi_stat "$PULLED_DEV" BdiReclaimable) + $(bdi_stat "$PULLED_DEV" BdiWriteback) )); }
start_kb=$(unwritten)
note dirty_kb "$start_kb"
"$SAFEUSB" prepare "$PULLED_USB" --policy "$unmount_policy" --json >"$OUT/prepare.out" 2>"$OUT/prepare.err" &
prep=$!
for _ in $(seq 1 600); do grep -q "run: /usr/bin/sync" "$OUT/prepare.err" && break; sleep 0.05; done
# Pull once the flush has visibly begun (or 2 s after its sync started), with most of the
# data still to write: at 1 MiB/s the 16 MiB take 16 s.
end=$(( $(date +%s%N) + 2000000000 ))
while [ "$(date +%s%N)" -lt "$end" ]; do
    left=$(unwritten 2>/dev/null || echo 0)
    [ "$left" -lt $(( start_kb - 512 )) ] && break
    sleep 0.05
done
left=$(unwritten 2>/dev/null || echo 0)
note left_at_pull_kb "$left"
pull PULLED
gone "/sys/bus/usb/devices/$PULLED_USB" 20 && note pulled 1
wait "$prep"
echo $? >"$OUT/prepare.rc"
note mounted_after "$(mounted /tmp/su-pulled)"
umount -l /tmp/su-pulled 2>/dev/null
true
