#!/bin/bash
# usb-net (CDC Ethernet 0525:a4a2, cdc_ether): down without address; up with an address
# and the default route; then moved into a named network namespace with both there.
. "$GUEST_LIB"
. "$GUEST_DIR/classes-lib.sh"
usb=$(usb_of 0525:a4a2) || exit 1
note usb "$usb"
ifname=$(net_of "$usb") || exit 1
note ifname "$ifname"
ifdevice=$(readlink -f "/sys/class/net/$ifname/device")
note ifdevice "$ifdevice"
ip -d link show "$ifname"
ip link set "$ifname" down
ip addr flush dev "$ifname"
inspect down "$usb" --json

ip addr add 10.99.0.2/24 dev "$ifname"
ip link set "$ifname" up
ip route add default via 10.99.0.1
ip addr show "$ifname"
ip route
inspect route "$usb" --json

ip route del default via 10.99.0.1
ip netns add x || exit 1
ip link set "$ifname" netns x || exit 1
ip -n x addr add 10.99.0.2/24 dev "$ifname"
ip -n x link set "$ifname" up
ip -n x route add default via 10.99.0.1
ip -n x route
note netns "$(stat -L -c %i /run/netns/x)"
note own_netns "$(stat -L -c %i /proc/self/ns/net)"
ls "$ifdevice/net/"
note net_nlink "$(stat -c %h "$ifdevice/net")"
inspect netns "$usb" --json
ip -n x link set "$ifname" down
ip -n x addr flush dev "$ifname"
inspect netns-down "$usb" --json
