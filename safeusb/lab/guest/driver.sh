#!/bin/bash
# Guest side of a boot: prepare the kernel and devices, run each scenario of the
# plan with its own output directory, and leave everything in the shared dir.
# Usage: driver.sh SHARE
set -u
share=$1
out=$share/out
mkdir -p "$out"
here=$(dirname "$(readlink -f "$0")")

mark() { echo "$1 $(cut -d' ' -f1 /proc/uptime)" >> "$out/timings"; }
log() { echo "driver: $*" | tee -a "$out/driver.log"; }

mark driver_start
# shellcheck source=/dev/null
. "$share/boot.env"

sysctl -q -w vm.dirty_writeback_centisecs=0 vm.dirty_expire_centisecs=360000
sysctl -q -w kernel.sysrq=1  # the host sends SysRq-W before it kills a stuck VM
mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug
for m in $MODULES; do modprobe "$m" || log "modprobe $m failed"; done

# usb_dir SERIAL: the sysfs directory of the USB device with that serial.
usb_dir() {
    local f
    for f in /sys/bus/usb/devices/*/serial; do
        [ "$(cat "$f" 2>/dev/null)" = "$1" ] && { dirname "$(readlink -f "$f")"; return 0; }
    done
    return 1
}

# Wait for every stick and export NAME_DEV, NAME_USB, NAME_BUSDEV, NAME_SERIAL.
: > "$share/sticks.env"
deadline=$(( $(date +%s) + 90 ))
while read -r var serial; do
    [ -n "$var" ] || continue
    dev=
    while [ "$(date +%s)" -lt "$deadline" ]; do
        if d=$(usb_dir "$serial"); then
            for b in "$d"/*/host*/target*/*/block/*; do
                [ -e "$b" ] && dev=$(basename "$b")
            done
        fi
        [ -n "$dev" ] && [ -e "/dev/$dev" ] && break
        dev=
        sleep 0.2
    done
    if [ -z "$dev" ]; then
        log "stick $var ($serial) did not appear"
        continue
    fi
    {
        echo "export ${var}_DEV=/dev/$dev"
        echo "export ${var}_USB=$(basename "$d")"
        echo "export ${var}_BUSDEV=$(cat "$d/busnum"):$(cat "$d/devnum")"
        echo "export ${var}_SERIAL=$serial"
    } >> "$share/sticks.env"
done < "$share/sticks"
# Sticks not plugged in at boot (a scenario plugs them): their serial only.
while read -r var serial; do
    [ -n "$var" ] && echo "export ${var}_SERIAL=$serial" >> "$share/sticks.env"
done < "$share/plugs"
# shellcheck source=/dev/null
. "$share/sticks.env"
mark devices_ready

if [ "$LIBVIRT" = 1 ]; then
    mark libvirt_start
    # shellcheck source=/dev/null
    . "$here/libvirt-up.sh"
fi

export SHARE=$share GUEST_LIB=$share/lib.sh SAFEUSB SAFEUSBD_CMD PYTHON REPO GUEST_DIR LAB_DIR
while read -r name tmo; do
    [ -n "$name" ] || continue
    d=$out/$name
    mkdir -p "$d"
    dmesg -C
    mark "scenario_start:$name"
    (cd /tmp && OUT=$d PAYLOAD=$share/payload/$name \
        timeout -k 5 "$tmo" bash "$share/scenarios/$name.sh" >"$d/stdout" 2>"$d/stderr" </dev/null)
    echo $? > "$d/rc"
    mark "scenario_end:$name"
    dmesg > "$d/kernel.log"
    log "scenario $name exit $(cat "$d/rc")"
done < "$share/plan"

timeout 60 sync || log "final sync did not finish"
dmesg > "$out/final-kernel.log"
mark driver_end
echo done > "$out/done"
