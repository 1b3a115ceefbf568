#!/bin/bash
# (c) The same with QEMU killed (SIGKILL) while it holds the stick: the kernel frees the
# interfaces as the process dies; safeusbd gives the stick back and remounts it.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
. "$GUEST_DIR/events-lib.sh"
mp=/tmp/su-crash
handed_over_then CRASH "$mp"
qemu=$(dom_qemu_pid)
note qemu_pid "$qemu"
kill -KILL "$qemu"
back_on_host CRASH "$mp"
note state_after "$(virsh domstate "$DOM")"
