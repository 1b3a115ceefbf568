#!/bin/bash
# (a) Auto-attach on plug-in, with an automounter racing for the stick. A stand-in for
# udisks runs the whole time: a udev rule that mounts every new disk at once on
# /media/NAME, unless udev marked it UDISKS_IGNORE=1 (what udisks honours). The stick
# AUTO is not plugged in at boot; the host plugs it in (device_add on the outer QEMU).
# Control: under a policy whose attach_to rule matches another vendor:product, the
# stick is automounted as today. Then, with a rule for its vendor:product to g1 and g1
# running: it ends in g1, never mounted on the host; pulled and plugged in again, it is
# attached again; with g1 shut off it comes back to the host unmounted, and goes to g1
# when g1 starts again. Nothing here attaches or prepares the stick: safeusbd does.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
. "$GUEST_DIR/events-lib.sh"
DOM=g1

# The stand-in automounter: every disk or partition that appears is mounted at once,
# from a process of its own (setsid), unless udev marked it as udisks would skip it.
cat >/tmp/su-automount.sh <<'EOS'
#!/bin/sh
name=$1 ignore=$2
if [ "$ignore" = 1 ]; then
    echo "skip $name UDISKS_IGNORE=1" >>/tmp/su-automount.log
    exit 0
fi
mkdir -p "/media/$name"
if mount "/dev/$name" "/media/$name" 2>>/tmp/su-automount.log; then
    echo "mounted $name" >>/tmp/su-automount.log
else
    rmdir "/media/$name"
    echo "not mounted $name" >>/tmp/su-automount.log
fi
EOS
chmod +x /tmp/su-automount.sh
mountpoint -q /media || mount -t tmpfs -o mode=0755 none /media  # the guest's / is read-only
: >/tmp/su-automount.log
mkdir -p /etc/udev/rules.d
echo 'ACTION=="add", SUBSYSTEM=="block", RUN+="/usr/bin/setsid -f /tmp/su-automount.sh %k $env{UDISKS_IGNORE}"' \
    >/etc/udev/rules.d/90-su-automount.rules
udevadm control --reload

# Every mount under /media, sampled every 50 ms until the end (one process: a shell loop
# forking grep would take a CPU of its own under emulation).
python3 -c '
import sys, time
while True:
    with open("/proc/self/mountinfo") as f:
        lines = [ln for ln in f if " /media/" in ln]
    if lines:
        with open(sys.argv[1], "a") as out:
            out.writelines(lines)
    time.sleep(0.05)
' "$OUT/media-mounts.log" &
sampler=$!

mkdir -p /etc/safeusb
write_policy() {  # VENDOR:PRODUCT: a rule handing that vendor:product to g1
    printf '[defaults]\nmount = "refuse"\n\n[[rules]]\nname = "test stick"\nvendor_product = "%s"\nattach_to = "g1"\n' \
        "$1" >/etc/safeusb/policy.toml
}

# in_g1 BUS:DEV: 1 when g1's live definition has a USB hostdev at that address.
in_g1() {
    virsh dumpxml g1 2>/dev/null | tr -d '\n' \
        | grep -c "<address bus='${1%%:*}' device='${1##*:}'/>" || true
}

# wait_in_g1 BUS:DEV SECONDS
wait_in_g1() {
    local i
    for i in $(seq 1 $(( $2 * 2 ))); do
        [ "$(in_g1 "$1")" -ge 1 ] && { echo 1; return 0; }
        sleep 0.5
    done
    echo 0
}

# busdev_of USB: BUS:DEV of the USB device now at that port.
busdev_of() { echo "$(cat "/sys/bus/usb/devices/$1/busnum"):$(cat "/sys/bus/usb/devices/$1/devnum")"; }

# disk_of USB: the disk below the USB device, once it is there (empty after 30 s).
disk_of() {
    local i b
    for i in $(seq 1 150); do
        for b in /sys/bus/usb/devices/"$1"/*/host*/target*/*/block/*; do
            [ -e "$b" ] && { basename "$b"; return 0; }
        done
        sleep 0.2
    done
}

# --- control: a device no rule matches is the host's, as today ---------------------------
write_policy 1234:5678
run_step udev_control "$SAFEUSB" install-udev-rules
note plug_control "$(plug AUTO)"
usb=$(usb_of "$AUTO_SERIAL" 60)
note control_usb "$usb"
disk=$(disk_of "$usb")
note control_disk "$disk"
note control_mounted "$(wait_mounted "/media/$disk" 30)"
umount "/media/$disk" 2>/dev/null
note unplug_control "$(unplug AUTO)"
gone "/sys/bus/usb/devices/$usb" 30
note control_attached "$(daemon_log | grep -c 'attached to domain')"
dmesg >"$OUT/kernel-control.log"
dmesg -C
cp /tmp/su-automount.log "$OUT/automount-control.log"
: >/tmp/su-automount.log
: >"$OUT/media-mounts.log"

# --- the rule for the stick's vendor:product, g1 running ------------------------------
write_policy 46f4:0001
run_step udev_rules "$SAFEUSB" install-udev-rules
cp /etc/udev/rules.d/10-safeusb-attach.rules "$OUT/10-safeusb-attach.rules" 2>/dev/null
run_step start_g1 virsh start --paused g1
note plug "$(plug AUTO)"
usb=$(usb_of "$AUTO_SERIAL" 60)
busdev=$(busdev_of "$usb")
note usb "$usb"
note busdev "$busdev"
note in_g1 "$(wait_in_g1 "$busdev" 120)"
note qemu_fds "$(qemu_usb_fds "$(qemu_pid)")"
note node "$(usb_node "$busdev")"
run_step status_attached "$SAFEUSB" status

# --- replug: attached again ---------------------------------------------------------------
note unplug "$(unplug AUTO)"
gone "/sys/bus/usb/devices/$usb/devnum" 30
note replug "$(plug AUTO)"
usb=$(usb_of "$AUTO_SERIAL" 60)
busdev=$(busdev_of "$usb")
note usb_replug "$usb"
note busdev_replug "$busdev"
note in_g1_replug "$(wait_in_g1 "$busdev" 120)"
note qemu_fds_replug "$(qemu_usb_fds "$(qemu_pid)")"
note node_replug "$(usb_node "$busdev")"

# --- g1 shut off: back on the host, unmounted; to g1 at its next start ---------------------
run_step destroy virsh destroy g1
disk=$(disk_of "$usb")
note back_disk "$disk"
sleep 5  # time for the automounter to act, had it been let
note back_mounted "$(awk -v d="/dev/$disk" '$0 ~ " - " && index($0, " " d " ")' /proc/self/mountinfo | wc -l)"
note back_ignore "$(udevadm info --query=property --name="/dev/$disk" 2>/dev/null | grep -c '^UDISKS_IGNORE=1$')"
note back_record "$([ -e "$(record_of "$usb")" ] && echo 1 || echo 0)"
run_step status_waiting "$SAFEUSB" status
run_step restart_g1 virsh start --paused g1
busdev=$(busdev_of "$usb")
note busdev_restart "$busdev"
note in_g1_restart "$(wait_in_g1 "$busdev" 120)"
note qemu_fds_restart "$(qemu_usb_fds "$(qemu_pid)")"
note node_restart "$(usb_node "$busdev")"

kill "$sampler" 2>/dev/null
cp /tmp/su-automount.log "$OUT/automount.log"
daemon_log >"$OUT/safeusbd.log"
