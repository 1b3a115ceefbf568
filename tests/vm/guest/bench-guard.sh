#!/bin/bash
# Guard cost benchmark (benchmarks/guard_cost.py): usbfs ioctls, write(2) and an idle
# stick's prepare + release, with the guard off, then on; load time and sizes.
. "$GUEST_DIR/guard-lib.sh"
guard_fs
intf=$(storage_intf "$BENCH_USB")
measure() {  # measure TAG
    python3 - "$BENCH_BUSDEV" "${intf##*.}" "$1" >"$OUT/ioctl-$1.json" 2>>"$OUT/errors" <<'PY'
import fcntl, json, os, statistics, struct, sys, time
bus, dev = (int(x) for x in sys.argv[1].split(":"))
ifnum, tag = int(sys.argv[2]), sys.argv[3]
fd = os.open(f"/dev/bus/usb/{bus:03d}/{dev:03d}", os.O_RDWR)
null = os.open("/dev/null", os.O_WRONLY)
def median_ns(call, n=3000):
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        try:
            call()
        except OSError:
            pass
        out.append(time.perf_counter_ns() - t)
    return statistics.median(out)
caps = bytearray(4)
connect = bytearray(struct.pack("iiQ", ifnum, 0x5517, 0))   # USBDEVFS_CONNECT: bound, EBUSY
disconnect = bytearray(struct.pack("iiQ", ifnum, 0x5516, 0))
res = {
    "get_capabilities": median_ns(lambda: fcntl.ioctl(fd, 0x8004551A, caps)),
    "ioctl_connect": median_ns(lambda: fcntl.ioctl(fd, 0xC0105512, connect)),
    "write_dev_null": median_ns(lambda: os.write(null, b"x")),
}
if tag == "on":  # refused by the guard (with the guard off this would detach the stick)
    res["ioctl_disconnect_refused"] = median_ns(lambda: fcntl.ioctl(fd, 0xC0105512, disconnect), 1000)
print(json.dumps(res))
PY
}
prepare_release() {  # prepare_release TAG: three rounds of an idle stick, seconds each
    local i
    for i in 1 2 3; do
        local t0 t1 t2
        t0=$(date +%s.%N)
        "$SAFEUSB" prepare "$BENCH_USB" >>"$OUT/prepare-$1.log" 2>&1 || echo "prepare failed" >>"$OUT/errors"
        t1=$(date +%s.%N)
        "$SAFEUSB" release "$BENCH_USB" >>"$OUT/release-$1.log" 2>&1 || echo "release failed" >>"$OUT/errors"
        t2=$(date +%s.%N)
        echo "$1 $t0 $t1 $t2" >>"$OUT/rounds"
        wait_for "/sys/bus/usb/devices/$intf/driver" 20
    done
}
"$SAFEUSB" guard disable >/dev/null 2>&1
measure off
prepare_release off
"$SAFEUSB" guard enable >"$OUT/enable.out" 2>"$OUT/enable.err"
echo $? >"$OUT/enable.rc"
bpftool prog show --json >"$OUT/progs.json" 2>>"$OUT/errors"
measure on
prepare_release on
"$SAFEUSB" guard status >"$OUT/status.out" 2>&1
"$SAFEUSB" guard disable >/dev/null 2>&1
