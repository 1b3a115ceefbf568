# Helpers for the kernel guard's scenarios (tests/vm/test_guard_vm.py); source after lib.sh.
# shellcheck source=/dev/null
. "$GUEST_LIB"

# guard_fs: securityfs and bpffs, as a distribution's boot mounts them.
guard_fs() {
    mountpoint -q /sys/kernel/security || mount -t securityfs none /sys/kernel/security
    mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
}

# guard_on: enable the guard and start safeusbd (it reads the refusals), once per boot.
guard_on() {
    guard_fs
    if [ ! -S /run/safeusb/safeusbd.sock ]; then
        mkdir -p /run/safeusb && chmod 0711 /run/safeusb
        setsid "$REPO/.venv/bin/safeusbd" -v >>"$SHARE/out/safeusbd.log" 2>&1 </dev/null &
        wait_for /run/safeusb/safeusbd.sock 60
    fi
    "$SAFEUSB" guard enable >"$OUT/enable.out" 2>"$OUT/enable.err"
    note enable_rc $?
    "$SAFEUSB" guard status >"$OUT/guard-status.out" 2>&1
    note status_rc $?
    # safeusbd notices the pinned guard within a second
    local i
    for i in $(seq 1 50); do
        [ -s /run/safeusb/guard-reader ] && break
        sleep 0.2
    done
    note reader "$(cat /run/safeusb/guard-reader 2>/dev/null)"
}

# storage_intf USB: the interface of device USB bound to usb-storage.
storage_intf() {
    local i
    for i in /sys/bus/usb/devices/"$1":*; do
        [ "$(basename "$(readlink "$i/driver" 2>/dev/null)")" = usb-storage ] && {
            basename "$i"; return 0; }
    done
    return 1
}

# mount_dirty DEV DIR: mount the stick and leave 4 MiB unwritten on it (data.bin).
mount_dirty() {
    mkdir -p "$2"
    mount -t ext4 "$1" "$2"
    cp "$PAYLOAD/data.bin" "$2/data.bin"
    note dirty_kb "$(bdi_stat "$1" BdiReclaimable)"
}

# after DEV DIR USB INTF: is the stick still mounted, with its data unwritten and bound?
after() {
    note mounted_after "$(mountpoint -q "$2" && echo 1 || echo 0)"
    note dirty_kb_after "$(bdi_stat "$1" BdiReclaimable 2>/dev/null || echo gone)"
    note driver_after "$(basename "$(readlink "/sys/bus/usb/devices/$4/driver" 2>/dev/null)")"
}

# usbfs_ioctls BUS:DEV IFNUM TAG: USBDEVFS_DISCONNECT (in USBDEVFS_IOCTL) and
# USBDEVFS_DISCONNECT_CLAIM on the device node; one line each: name and errno (0 = done).
usbfs_ioctls() {
    python3 - "$1" "$2" >"$OUT/$3.out" 2>&1 <<'PY'
import errno, fcntl, os, struct, sys
bus, dev = (int(x) for x in sys.argv[1].split(":"))
ifnum = int(sys.argv[2])
fd = os.open(f"/dev/bus/usb/{bus:03d}/{dev:03d}", os.O_RDWR)
def attempt(name, req, arg):
    try:
        fcntl.ioctl(fd, req, arg)
        print(name, 0)
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
attempt("DISCONNECT", 0xC0105512, bytearray(struct.pack("iiQ", ifnum, 0x5516, 0)))
attempt("DISCONNECT_CLAIM", 0x8108551B, bytearray(struct.pack("II256s", ifnum, 0, b"")))
PY
}

# redirect USB TAG SECONDS INTF: usbredirect sending the stick at port USB to a local
# listener (it claims the device as it connects), until it took the stick or said why (at
# most SECONDS); notes whether it still runs and which driver INTF has then (usbfs:
# usbredirect took it).
# Debian's usbredirect selects by vendor:product only and every emulated stick is
# 46f4:0001, so it runs in a mount namespace whose /sys/bus/usb/devices lists that stick
# and its hubs alone (libusb and libudev enumerate from there), as if it were the only
# stick plugged in.
redirect() {
    local port=$((4000 + RANDOM % 1000))
    python3 -c 'import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(1)
c, _ = s.accept()
time.sleep(float(sys.argv[2]) + 3)' "$port" "$3" &
    local server=$!
    sleep 1
    unshare -m sh -c 'set -e
        d=$(mktemp -d)
        mount -t tmpfs none "$d"
        p=$(readlink -f "/sys/bus/usb/devices/$1")
        while [ -e "$p/busnum" ]; do  # the stick and the hubs above it
            ln -s "$p" "$d/$(basename "$p")"
            p=$(dirname "$p")
        done
        mount --bind "$d" /sys/bus/usb/devices
        exec usbredirect --device 46f4:0001 --to "127.0.0.1:$2"' sh "$1" "$port" \
        >"$OUT/$2.out" 2>"$OUT/$2.err" &
    local pid=$! i
    # until it took the stick, gave up or said why (it starts slowly under TCG)
    for i in $(seq 1 $(( $3 * 5 ))); do
        [ "$(basename "$(readlink "/sys/bus/usb/devices/$4/driver" 2>/dev/null)")" = usbfs ] \
            && break
        [ -s "$OUT/$2.err" ] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    sleep 1
    note "$2_running" "$(kill -0 "$pid" 2>/dev/null && echo 1 || echo 0)"
    note "$2_driver" "$(basename "$(readlink "/sys/bus/usb/devices/$4/driver" 2>/dev/null)")"
    kill "$pid" "$server" 2>/dev/null
    wait "$pid" "$server" 2>/dev/null
    echo "redirect $2: $(head -c 300 "$OUT/$2.err")"
}

# driver_of INTF: the driver bound to interface INTF (usb-storage, usbfs), or nothing.
driver_of() {
    basename "$(readlink "/sys/bus/usb/devices/$1/driver" 2>/dev/null)"
}

# wait_prepared USB INTF: after a refusal, until safeusbd has prepared the idle stick
# (INTF without driver; an inspect and a prepare under TCG take a while), at most 60 s;
# notes prepared (1: unbound) and record (1: safeusb's record of the handover is there).
wait_prepared() {
    local i
    for i in $(seq 1 300); do
        [ -e "/sys/bus/usb/devices/$2/driver" ] || break
        sleep 0.2
    done
    note prepared "$([ -e "/sys/bus/usb/devices/$2/driver" ] && echo 0 || echo 1)"
    note record "$([ -e "/run/safeusb/$1.json" ] && echo 1 || echo 0)"
    # the record says it was prepared on a refusal: safeusbd follows it by the stricter rule
    note after_refusal "$(grep -c '"after_refusal": true' "/run/safeusb/$1.json" 2>/dev/null)"
}

# qmp_hmp SOCKET COMMAND: a human monitor command through a QMP socket; prints its output.
qmp_hmp() {
    python3 - "$1" "$2" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
f = s.makefile("rw")
def ask(cmd):
    f.write(json.dumps(cmd) + "\n")
    f.flush()
    while True:
        msg = json.loads(f.readline())
        if "return" in msg or "error" in msg:
            return msg
json.loads(f.readline())  # the greeting
ask({"execute": "qmp_capabilities"})
msg = ask({"execute": "human-monitor-command", "arguments": {"command-line": sys.argv[2]}})
print(msg.get("return", msg))
PY
}
