#!/bin/bash
# safeusb unprotect gives g1 its real emulator back; it starts without the gate.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
run_step unprotect "$SAFEUSB" unprotect g1
note inactive_emulator "$(emulator_of --inactive)"
note metadata "$(virsh dumpxml --inactive g1 | grep -c 'safeusb:gate')"
run_step start virsh start --paused g1
note live_emulator "$(emulator_of)"
note proxies "$(proxy_pids | wc -l)"
note state "$(virsh domstate g1)"
virsh destroy g1 >/dev/null 2>&1
