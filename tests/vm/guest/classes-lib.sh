# Helpers for the classes-*.sh scenarios (emulated keyboard, serial adapter, network
# adapter); source after "$GUEST_LIB".

# usb_of VIDPID [PRODUCT]: the sysfs name of the only USB device with that vendor:product
# (and that product string: QEMU's keyboard, mouse and tablet all are 0627:0001).
usb_of() {
    local i d found
    for i in $(seq 1 150); do
        found=
        for d in /sys/bus/usb/devices/*; do
            [ -e "$d/idVendor" ] || continue
            [ "$(cat "$d/idVendor"):$(cat "$d/idProduct")" = "$1" ] || continue
            [ -z "${2:-}" ] || [ "$(cat "$d/product" 2>/dev/null)" = "$2" ] || continue
            found="$found $(basename "$d")"
        done
        if [ -n "$found" ]; then
            set -- $found
            [ $# -eq 1 ] || { echo "more than one USB device matches:$found" >&2; return 1; }
            echo "$1"
            return 0
        fi
        sleep 0.2
    done
    echo "no USB device $1 ${2:-}" >&2
    return 1
}

# input_of USBNAME: the input device (inputN) under that USB device, once it has an
# event node.
input_of() {
    local i d
    for i in $(seq 1 150); do
        for d in /sys/bus/usb/devices/"$1":1.0/*/input/input*; do
            ls "$d" | grep -q '^event' && { basename "$d"; return 0; }
        done
        sleep 0.2
    done
    echo "no input device with an event node under $1" >&2
    return 1
}

# unbind_serio DRIVER: unbind that serio driver (atkbd, psmouse) from every port.
unbind_serio() {
    local s
    for s in /sys/bus/serio/drivers/"$1"/serio*; do
        [ -e "$s" ] || continue
        echo "unbinding $1 from ${s##*/}"
        echo "${s##*/}" > "/sys/bus/serio/drivers/$1/unbind"
    done
}

# net_of USBNAME [SECONDS]: the network interface whose sysfs device lies under that USB
# device (in this namespace).
net_of() {
    local i n
    for i in $(seq 1 $(( ${2:-30} * 5 ))); do
        for n in /sys/class/net/*; do
            case "$(readlink -f "$n/device" 2>/dev/null)" in
                */"$1"/*|*/"$1") basename "$n"; return 0 ;;
            esac
        done
        sleep 0.2
    done
    echo "no network interface under USB device $1" >&2
    return 1
}

# input_facts NAME: every input device as "inputN|name|phys|handlers|ev|key|syspath" in
# $OUT/NAME, and /proc/bus/input/devices in $OUT/NAME.proc.
input_facts() {
    local d
    for d in /sys/class/input/input*; do
        echo "$(basename "$d")|$(cat "$d/name")|$(cat "$d/phys" 2>/dev/null)|$(ls "$d" | grep -E '^(event|mouse|js)[0-9]+$' | paste -sd, -)|$(cat "$d/capabilities/ev")|$(cat "$d/capabilities/key")|$(readlink -f "$d")"
    done | tee "$OUT/${1:-inputs}"
    cp /proc/bus/input/devices "$OUT/${1:-inputs}.proc"
}
