# Shared by the events scenarios (sourced after lib.sh and gate-lib.sh): safeusbd gives
# devices back on its own; nothing here runs `safeusb release`. The domain is g2, which
# safeusbd protected when it was defined (events-newdomain.sh).
DOM=g2

# dom_qemu_pid: the pid libvirt tracks for g2.
dom_qemu_pid() { cat "/run/libvirt/qemu/$DOM.pid" 2>/dev/null; }

# unwritten_kb DEV: dirty and under-writeback kB of the device.
unwritten_kb() { echo $(( $(bdi_stat "$1" BdiReclaimable) + $(bdi_stat "$1" BdiWriteback) )); }

# record_of USB: the record safeusb keeps while the device is handed over.
record_of() { echo "/run/safeusb/$1.json"; }

# wait_mounted MOUNTPOINT SECONDS: until something is mounted there (1) or not (0).
wait_mounted() {
    local i
    for i in $(seq 1 $(( $2 * 5 ))); do
        [ "$(mounted "$1")" -ge 1 ] && { echo 1; return 0; }
        sleep 0.2
    done
    echo 0
}

# wait_gone_file PATH SECONDS: 1 once PATH no longer exists, 0 if it still does.
wait_gone_file() {
    local i
    for i in $(seq 1 $(( $2 * 5 ))); do
        [ -e "$1" ] || { echo 1; return 0; }
        sleep 0.2
    done
    echo 0
}

# daemon_log: safeusbd's log so far.
daemon_log() { cat "$SHARE/out/safeusbd.log" 2>/dev/null; }

# handed_over_then STICK MOUNTPOINT: mount the stick there, write the payload into it
# (left dirty), attach it live through the gate (mount = "unmount" in the policy), and
# note what the host then has: it must be unmounted, unbound, open in QEMU, recorded.
handed_over_then() {
    local var=$1 mp=$2 dev usb busdev
    dev=$(eval echo "\$${var}_DEV")
    usb=$(eval echo "\$${var}_USB")
    busdev=$(eval echo "\$${var}_BUSDEV")
    mkdir -p "$mp"
    mount -t ext4 "$dev" "$mp"
    cp "$PAYLOAD/data.bin" "$mp/data.bin"
    note dirty_kb "$(bdi_stat "$dev" BdiReclaimable)"
    note options_before "$(awk -v m="$mp" '$5 == m { print $6 }' /proc/self/mountinfo)"
    hostdev_xml "$busdev" >"/tmp/$var-hostdev.xml"
    virsh attach-device "$DOM" "/tmp/$var-hostdev.xml" --live >"$OUT/attach.out" 2>&1
    note attach_rc $?
    note mounted_handed "$(mounted "$mp")"
    note record_handed "$([ -e "$(record_of "$usb")" ] && echo 1 || echo 0)"
    note qemu_fds_handed "$(qemu_usb_fds "$(dom_qemu_pid)")"
    note node "$(usb_node "$busdev")"
    # Still handed over a few seconds later: safeusbd did not take it back while QEMU
    # holds it.
    sleep 3
    note mounted_later "$(mounted "$mp")"
    note record_later "$([ -e "$(record_of "$usb")" ] && echo 1 || echo 0)"
}

# back_on_host STICK MOUNTPOINT: wait for safeusbd to give the stick back, and note it.
back_on_host() {
    local var=$1 mp=$2 usb
    usb=$(eval echo "\$${var}_USB")
    note remounted "$(wait_mounted "$mp" 90)"
    note record_gone "$(wait_gone_file "$(record_of "$usb")" 30)"
    note options_after "$(awk -v m="$mp" '$5 == m { print $6 }' /proc/self/mountinfo)"
    note driver_after "$(basename "$(readlink "/sys/bus/usb/devices/$usb:1.0/driver" 2>/dev/null)" 2>/dev/null)"
    if [ -e "$mp/data.bin" ] && cmp -s "$PAYLOAD/data.bin" "$mp/data.bin"; then
        note data_back 1
    else
        note data_back 0
    fi
    daemon_log >"$OUT/safeusbd.log"
}
