#!/bin/bash
# network = "down" on the CDC Ethernet adapter, left by classes-net.sh in namespace x:
# configured there again by hand (address, up, default route, one more route), refused
# under the built-in policy, then taken down and its driver unbound under
# network = "down"; release binds it again and puts it back in x as it was.
. "$GUEST_LIB"
. "$GUEST_DIR/classes-lib.sh"
usb=$(usb_of 0525:a4a2) || exit 1
ifname=$(ip -n x -o link show | awk -F': ' '$2 != "lo" { sub(/@.*/, "", $2); print $2 }')
note ifname "$ifname"
[ -n "$ifname" ] || { echo "no interface in namespace x" >&2; exit 1; }
# cdc_ether (a fixed address) or cdc_subset (a new made-up address on every bind),
# whichever the kernel bound: release must find the interface again either way.
drivers() {
    local d
    for d in /sys/bus/usb/devices/"$usb":1.*; do
        [ -e "$d/driver" ] && printf '%s:%s ' "${d##*:}" "$(basename "$(readlink "$d/driver")")"
    done
}
note drivers "$(drivers)"
ip -n x addr add 10.99.0.2/24 dev "$ifname"
ip -n x link set "$ifname" up
ip -n x route add default via 10.99.0.1
ip -n x route add 10.98.0.0/16 via 10.99.0.1
ip -n x -4 route
printf '[defaults]\nnetwork = "down"\n' >/tmp/down-policy.toml

"$SAFEUSB" prepare "$usb" --json >"$OUT/refused.out" 2>"$OUT/refused.err"
echo $? >"$OUT/refused.rc"
"$SAFEUSB" prepare "$usb" --policy /tmp/down-policy.toml --json >"$OUT/prepare.out" 2>"$OUT/prepare.err"
echo $? >"$OUT/prepare.rc"
note in_x_after_prepare "$(ip -n x -o link show | grep -vc ': lo:')"
note in_host_after_prepare "$(net_of "$usb" 1 2>/dev/null | wc -l)"
"$SAFEUSB" release "$usb" --policy /tmp/down-policy.toml --json >"$OUT/release.out" 2>"$OUT/release.err"
echo $? >"$OUT/release.rc"
ip -n x -d link show
ip -n x -4 addr
ip -n x -4 route
note up_after "$(ip -n x -o link show "$ifname" | grep -c '[<,]UP[,>]')"
note addr_after "$(ip -n x -o -4 addr show dev "$ifname" | grep -c ' 10.99.0.2/24 ')"
note default_after "$(ip -n x -4 route show default | grep -c 'via 10.99.0.1 dev')"
note route_after "$(ip -n x -4 route show 10.98.0.0/16 | grep -c 'via 10.99.0.1')"
note in_host_after "$(net_of "$usb" 1 2>/dev/null | wc -l)"
note drivers_after "$(drivers)"
