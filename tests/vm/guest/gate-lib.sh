# Shared by the gate scenarios (sourced after lib.sh): the nested domain g1 under
# `safeusb protect`, its QEMU and the gate's proxy process.
LAUNCHER=/usr/local/lib/safeusb/gate/usr/bin/qemu-system-x86_64

# run_step TAG CMD...: run CMD, keep exit code, stdout and stderr under TAG.
run_step() {
    local tag=$1
    shift
    local start
    start=$(cut -d' ' -f1 /proc/uptime)
    "$@" >"$OUT/$tag.out" 2>"$OUT/$tag.err"
    echo $? >"$OUT/$tag.rc"
    echo "$(cut -d' ' -f1 /proc/uptime) - $start" | bc >"$OUT/$tag.seconds"
    echo "$tag ($*): exit $(cat "$OUT/$tag.rc")"
}

mounted() { awk -v m="$1" '$5 == m' /proc/self/mountinfo | wc -l; }
present() { [ -e "/sys/class/block/$(basename "$1")" ] && echo 1 || echo 0; }
alive() { kill -0 "$1" 2>/dev/null && echo 1 || echo 0; }

# emulator_of [--inactive]: g1's <emulator> in its live (or inactive) definition.
emulator_of() { virsh dumpxml "$@" g1 | sed -n 's|.*<emulator>\(.*\)</emulator>.*|\1|p'; }

# usb_hostdevs: <hostdev type='usb'> elements in g1's live definition.
usb_hostdevs() { virsh dumpxml g1 | grep -c "<hostdev mode='subsystem' type='usb'"; }

# qemu_pid: the pid libvirt tracks for g1.
qemu_pid() { cat /run/libvirt/qemu/g1.pid 2>/dev/null; }

# proxy_pids: processes running the gate's launcher (the interpreter's first argument)
# other than QEMU, which exec'ed away from it.
proxy_pids() {
    local q
    q=$(qemu_pid)
    pgrep -f -- "^[^ ]+ $LAUNCHER( |\$)" | grep -vx "${q:-none}"
}

# gate_log: the gate's lines in g1's domain log.
gate_log() { grep -F "safeusb-qemu-gate[" /var/log/libvirt/qemu/g1.log 2>/dev/null; }

# usb_node BUS:DEV: the device node usb-host opens for that address.
usb_node() { printf '/dev/bus/usb/%03d/%03d' "${1%%:*}" "${1##*:}"; }

# qemu_usb_fds PID: the USB device nodes open in that process, sorted, space-separated.
qemu_usb_fds() {
    local f
    for f in /proc/"$1"/fd/*; do readlink "$f"; done 2>/dev/null \
        | grep '^/dev/bus/usb/' | sort -u | tr '\n' ' ' | sed 's/ $//'
}
