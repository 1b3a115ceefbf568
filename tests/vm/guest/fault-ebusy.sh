#!/bin/bash
# umount fails with EBUSY: a process moves its working directory onto the second mount
# while prepare is flushing. prepare undoes the first unmount and says the host is as before.
. "$GUEST_LIB"
. "$GUEST_DIR/handover-lib.sh"
mkdir -p /tmp/su-in-a /tmp/su-in-b
mount -t ext4 "$BUSY_DEV" /tmp/su-in-b
cp "$PAYLOAD/data.bin" /tmp/su-in-b/data.bin
unshare -m --propagation private sh -c "mount -t ext4 $BUSY_DEV /tmp/su-in-a && exec sleep 600" &
nspid=$!
for _ in $(seq 1 50); do [ "$(awk '$5 == "/tmp/su-in-a"' /proc/$nspid/mountinfo | wc -l)" = 1 ] && break; sleep 0.1; done
note ns_inode "$(stat -L -c %i /proc/$nspid/ns/mnt)"
note own_inode "$(stat -L -c %i /proc/self/ns/mnt)"
"$SAFEUSB" prepare "$BUSY_USB" --policy "$unmount_policy" --json >"$OUT/prepare.out" 2>"$OUT/prepare.err" &
prep=$!
# Once the flush has begun (inspect and planning are behind it), the intruder moves in.
for _ in $(seq 1 600); do grep -q "run: /usr/bin/sync" "$OUT/prepare.err" && break; sleep 0.05; done
# The intruder enters whichever mount is unmounted last (the namespace with the larger inode).
if [ "$(stat -L -c %i /proc/$nspid/ns/mnt)" -gt "$(stat -L -c %i /proc/self/ns/mnt)" ]; then
    nsenter -t "$nspid" -m sh -c 'cd /tmp/su-in-a && exec sleep 600' &
    note intruder a
else
    (cd /tmp/su-in-b && exec sleep 600) &
    note intruder b
fi
wait "$prep"
echo $? >"$OUT/prepare.rc"
note mounted_a "$(awk '$5 == "/tmp/su-in-a"' /proc/$nspid/mountinfo | wc -l)"
note mounted_b "$(mounted /tmp/su-in-b)"
note disk_after "$(present "$BUSY_DEV")"
