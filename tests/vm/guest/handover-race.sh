#!/bin/bash
# A program keeps mounting the stick while prepare runs. Once prepare holds the device,
# every attempt fails; mounts that got in while it was still mounted are unmounted too.
. "$GUEST_LIB"
. "$GUEST_DIR/handover-lib.sh"
mkdir -p /tmp/race-a /tmp/race-b
mount -t ext4 "$RACE_DEV" /tmp/race-a
cp "$PAYLOAD/data.bin" /tmp/race-a/data.bin
(
    while [ ! -e /tmp/race-stop ]; do
        if mount -t ext4 "$RACE_DEV" /tmp/race-b 2>/dev/null; then
            echo "$(date +%s.%N) mounted" >>"$OUT/racer.log"
            umount /tmp/race-b 2>/dev/null
        else
            echo "$(date +%s.%N) failed" >>"$OUT/racer.log"
        fi
    done
) &
racer=$!
sleep 1
date +%s.%N >"$OUT/prepare.start"
# The racer's own mount(8) holds the node for a moment at a time: open = "force" lets
# prepare go on when it catches one (it is reported, not killed).
printf '[defaults]\nmount = "unmount"\nopen = "force"\n' >/tmp/race-policy.toml
run_safeusb prepare prepare "$RACE_USB" --policy /tmp/race-policy.toml --json
date +%s.%N >"$OUT/prepare.end"
sleep 1
touch /tmp/race-stop
wait "$racer"
note mounted_a "$(mounted /tmp/race-a)"
note mounted_b "$(mounted /tmp/race-b)"
note disk_after "$(present "$RACE_DEV")"
