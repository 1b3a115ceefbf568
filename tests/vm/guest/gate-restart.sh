#!/bin/bash
# libvirtd restarts while g1 runs behind the gate: the new libvirtd reconnects through the
# same proxy, monitor commands work, and under the built-in policy again a live attach of
# the mounted, dirty stick is still refused.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
qemu=$(qemu_pid)
note qemu_pid "$qemu"
note proxy "$(proxy_pids)"
old=$(pgrep -x libvirtd)
note libvirtd_old "$old"
kill $old
for _ in $(seq 1 300); do [ "$(alive "$old")" = 0 ] && break; sleep 0.1; done
note libvirtd_old_alive "$(alive "$old")"
start=$(cut -d' ' -f1 /proc/uptime)
libvirtd -d
for _ in $(seq 1 600); do virsh -q version >/dev/null 2>&1 && break; sleep 0.1; done
note libvirtd_new "$(pgrep -x libvirtd)"
note restart_seconds "$(echo "$(cut -d' ' -f1 /proc/uptime) - $start" | bc)"
note state "$(virsh domstate g1)"
note qemu_pid_after "$(qemu_pid)"
note qemu_alive "$(alive "$qemu")"
note proxy_after "$(proxy_pids)"
run_step status virsh qemu-monitor-command g1 '{"execute":"query-status"}'
rm -f /etc/safeusb/policy.toml
hostdev_xml "$REFUSE_BUSDEV" >/tmp/su-refuse-hostdev.xml
virsh attach-device g1 /tmp/su-refuse-hostdev.xml --live >"$OUT/attach.out" 2>&1
note attach_rc $?
cat "$OUT/attach.out"
note mounted_after "$(mounted /tmp/su-refuse)"
note dirty_kb_after "$(bdi_stat "$REFUSE_DEV" BdiReclaimable)"
gate_log >"$OUT/gate.log"
