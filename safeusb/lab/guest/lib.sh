# Helpers for scenario scripts; source with: . "$GUEST_LIB"
# Each scenario runs with OUT (its output directory), PAYLOAD (its payload files),
# SAFEUSB (the CLI under test), GUEST_DIR (the directory of the boot's scenario scripts),
# LAB_DIR (this one's: g1.xml) and NAME_DEV/NAME_USB/NAME_BUSDEV/NAME_SERIAL per stick.
set -u

# inspect TAG ARGS...: run `safeusb inspect ARGS`, keep exit code, stdout, stderr.
inspect() {
    local tag=$1
    shift
    "$SAFEUSB" inspect "$@" >"$OUT/$tag.out" 2>"$OUT/$tag.err"
    echo $? >"$OUT/$tag.rc"
    echo "inspect $tag ($*): exit $(cat "$OUT/$tag.rc")"
}

# note KEY VALUE: a fact for the test to read back with result.file("notes").
note() { echo "$1=$2" >>"$OUT/notes"; }

# bdi_stat DEV FIELD: a field of the per-device writeback statistics, in kB.
bdi_stat() {
    local mm
    mm=$(cat "/sys/class/block/$(basename "$1")/dev")
    awk -v f="$2:" '$1 == f { print $2 }' "/sys/kernel/debug/bdi/$mm/stats"
}

# wait_for PATH [SECONDS]: until PATH exists.
wait_for() {
    local i
    for i in $(seq 1 $(( ${2:-10} * 10 ))); do
        [ -e "$1" ] && return 0
        sleep 0.1
    done
    echo "timed out waiting for $1" >&2
    return 1
}

# partition DEV N: the node of partition N of disk DEV (reread the table first).
partition() {
    blockdev --rereadpt "$1" 2>/dev/null || partx -u "$1" 2>/dev/null || true
    wait_for "$1$2" 10 && echo "$1$2"
}

# hostdev_xml BUS:DEV: a libvirt <hostdev> for the USB device at that address.
hostdev_xml() {
    printf "<hostdev mode='subsystem' type='usb'>\n  <source><address bus='%s' device='%s'/></source>\n</hostdev>\n" \
        "${1%%:*}" "${1##*:}"
}

# record_fixture: facts about the stick, then the sysfs/procfs/debugfs trees
# safeusb reads, into $OUT/tree (tools/record-fixtures moves it to tests/fixtures/).
record_fixture() {
    note kernel "$(uname -r)"
    note usb "$STICK_USB"
    note dev "$STICK_DEV"
    note busdev "$STICK_BUSDEV"
    note serial "$STICK_SERIAL"
    note recorder_ns "$(stat -L -c %i /proc/self/ns/mnt)"
    python3 "$GUEST_DIR/record.py" "$OUT/tree"
}

# pull NAME: have the host pull stick NAME (its variable name, e.g. DATA) out of the
# machine, as a user yanking it would (device_del on the outer QEMU's monitor).
pull() { : >"$SHARE/out/pull/$1"; }

# gone PATH [SECONDS]: until PATH no longer exists.
gone() {
    local i
    for i in $(seq 1 $(( ${2:-10} * 10 ))); do
        [ -e "$1" ] || return 0
        sleep 0.1
    done
    echo "timed out waiting for $1 to go" >&2
    return 1
}

# plug NAME / unplug NAME: the host plugs stick NAME (its variable name, `AUTO` for a
# stick called `auto`) into the running machine, or pulls it out, through the outer
# QEMU's monitor (PlugService in safeusb/lab/harness.py: device_add of the same drive,
# serial and id; device_del). Prints the host's answer ("ok" or the error) once it is done.
plug_request() {
    local req
    req="$SHARE/out/plug/$(date +%s%N)-$1-$2"
    : >"$req"
    wait_for "$req.done" 30 && cat "$req.done"
}
plug() { plug_request plug "$1"; }
unplug() { plug_request pull "$1"; }

# usb_of SERIAL [SECONDS]: the sysfs name of the USB device with that serial, once
# it is there.
usb_of() {
    local i f
    for i in $(seq 1 $(( ${2:-30} * 5 ))); do
        for f in /sys/bus/usb/devices/*/serial; do
            [ "$(cat "$f" 2>/dev/null)" = "$1" ] && { basename "$(dirname "$f")"; return 0; }
        done
        sleep 0.2
    done
    return 1
}
