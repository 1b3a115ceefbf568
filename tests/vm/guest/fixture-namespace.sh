#!/bin/bash
# ext4 mounted only in a private mount namespace, where a process keeps a file
# open; another process holds the raw disk node open.
. "$GUEST_LIB"
mkdir -p /tmp/nsmnt
unshare -m --propagation private sh -c \
    "mount -t ext4 $STICK_DEV /tmp/nsmnt && echo hi > /tmp/nsmnt/f && exec sleep 600 < /tmp/nsmnt/f" &
ns_pid=$!
for _ in $(seq 1 50); do
    grep -q ' /tmp/nsmnt ' "/proc/$ns_pid/mountinfo" 2>/dev/null && break
    sleep 0.1
done
sleep 600 <"$STICK_DEV" &
note ns_pid "$ns_pid"
note raw_pid $!
note mnt_ns "$(stat -L -c %i "/proc/$ns_pid/ns/mnt")"
sleep 0.5
record_fixture
