#!/bin/bash
# safeusb protect on g1, defined and running paused: the definition gets the gate as its
# emulator; after destroy and start the domain runs behind the gate, QEMU in the process
# libvirt tracks and the gate's proxy beside it.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
note state_before "$(virsh domstate g1)"
run_step protect "$SAFEUSB" protect g1
note inactive_emulator "$(emulator_of --inactive)"
note live_emulator_before_restart "$(emulator_of)"
note metadata "$(virsh dumpxml --inactive g1 | grep -c '<safeusb:emulator>/usr/bin/qemu-system-x86_64</safeusb:emulator>')"
note launcher_target "$(readlink "$LAUNCHER")"
run_step destroy virsh destroy g1
start=$(date +%s.%N)
run_step start virsh start --paused g1
note start_seconds "$(echo "$(date +%s.%N) - $start" | bc)"
note live_emulator "$(emulator_of)"
note state "$(virsh domstate g1)"
qemu=$(qemu_pid)
note qemu_pid "$qemu"
note qemu_exe "$(readlink "/proc/$qemu/exe")"
note proxies "$(proxy_pids | wc -l)"
# How libvirt runs it: as whom, under which AppArmor label, in which mount namespace.
note qemu_user "$(ps -o user= -p "$qemu")"
note qemu_label "$(cat "/proc/$qemu/attr/current" 2>/dev/null)"
note qemu_own_mntns "$([ "$(readlink "/proc/$qemu/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ] && echo 1 || echo 0)"
proxy=$(proxy_pids | head -n1)
note proxy_user "$(ps -o user= -p "$proxy")"
note proxy_label "$(cat "/proc/$proxy/attr/current" 2>/dev/null)"
note libvirtd_label "$(cat "/proc/$(pgrep -xo libvirtd)/attr/current" 2>/dev/null)"
run_step status virsh qemu-monitor-command g1 '{"execute":"query-status"}'
gate_log >"$OUT/gate.log"
cp /var/log/libvirt/qemu/g1.log "$OUT/g1.log"
