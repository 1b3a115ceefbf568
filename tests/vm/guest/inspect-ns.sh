#!/bin/bash
# ext4 mounted only inside a private mount namespace: invisible in ours.
. "$GUEST_LIB"
mkdir -p /tmp/nsmnt
unshare -m --propagation private sh -c "mount -t ext4 $NS_DEV /tmp/nsmnt && exec sleep 600" &
pid=$!
note pid "$pid"
for _ in $(seq 1 50); do
    grep -q ' /tmp/nsmnt ' "/proc/$pid/mountinfo" 2>/dev/null && break
    sleep 0.1
done
grep ' /tmp/nsmnt ' "/proc/$pid/mountinfo" || { echo "mount in namespace did not happen" >&2; exit 1; }
note mnt_ns "$(stat -L -c %i "/proc/$pid/ns/mnt")"
note own_ns "$(stat -L -c %i /proc/self/ns/mnt)"
grep -q ' /tmp/nsmnt ' /proc/self/mountinfo && { echo "mount leaked into our namespace" >&2; exit 1; }
inspect ns "$NS_USB" --json
