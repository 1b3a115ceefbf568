#!/bin/bash
# Killing the gate's proxy leaves the guest running: libvirt still sees the domain, its
# QEMU lives on. Monitor commands get no answer (nothing more reaches the guest);
# `virsh destroy` still ends it.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
qemu=$(qemu_pid)
proxies=$(proxy_pids)
note qemu_pid "$qemu"
note proxies "$(echo $proxies)"
[ -n "$proxies" ] && kill -KILL $proxies
sleep 3
alive_after=0
for p in $proxies; do [ "$(alive "$p")" = 1 ] && alive_after=$((alive_after + 1)); done
note proxies_alive_after "$alive_after"
note state_after_kill "$(virsh domstate g1)"
note qemu_alive_after_kill "$(alive "$qemu")"
note qemu_pid_after_kill "$(qemu_pid)"
sleep 5
note state_later "$(virsh domstate g1)"
note qemu_alive_later "$(alive "$qemu")"
run_step noanswer timeout 15 virsh qemu-monitor-command g1 '{"execute":"query-status"}'
note state_after_noanswer "$(virsh domstate g1)"
start=$(date +%s.%N)
run_step destroy timeout 60 virsh destroy g1
note destroy_seconds "$(echo "$(date +%s.%N) - $start" | bc)"
note state_after_destroy "$(virsh domstate g1)"
note qemu_alive_after_destroy "$(alive "$qemu")"
cp /var/log/libvirt/qemu/g1.log "$OUT/g1.log"
