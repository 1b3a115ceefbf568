#!/bin/bash
# The network adapter's interface (left in namespace x by classes-net.sh) in namespaces
# that no name pins: one a process is in; one only an open descriptor holds; one only a
# socket holds (out of reach: must not pass as free); and back in ours once that one is
# gone.
. "$GUEST_LIB"
. "$GUEST_DIR/classes-lib.sh"
usb=$(usb_of 0525:a4a2) || exit 1
ifname=$(ip -n x -o link show | awk -F': ' '$2 != "lo" { sub(/@.*/, "", $2); print $2 }' | head -1)
[ -n "$ifname" ] || { echo "no interface in namespace x" >&2; exit 1; }
note ifname "$ifname"
own=$(stat -L -c %i /proc/self/ns/net)

unshare -n sleep 600 &
pinner=$!
for _ in $(seq 1 50); do
    [ "$(stat -L -c %i "/proc/$pinner/ns/net" 2>/dev/null)" != "$own" ] && break
    sleep 0.1
done
pinned=$(stat -L -c %i "/proc/$pinner/ns/net")
[ "$pinned" != "$own" ] || { echo "unshare -n made no namespace" >&2; exit 1; }
note pinner "$pinner"
note pinned_netns "$pinned"
ip -n x link set "$ifname" netns "$pinner" || exit 1
ip netns del x
nsenter -t "$pinner" -n ip addr add 10.99.0.2/24 dev "$ifname"
nsenter -t "$pinner" -n ip link set "$ifname" up
nsenter -t "$pinner" -n ip route add default via 10.99.0.1
inspect process "$usb" --json

sleep 600 3<"/proc/$pinner/ns/net" &
holder=$!
note holder "$holder"
kill "$pinner"
wait "$pinner" 2>/dev/null
sleep 0.5
[ "$(stat -L -c %i "/proc/$holder/fd/3")" = "$pinned" ] || { echo "descriptor lost" >&2; exit 1; }
inspect descriptor "$usb" --json

# A process that makes a socket in that namespace, returns to its own and closes every
# descriptor of a namespace: only the socket keeps the namespace alive.
"$REPO/.venv/bin/python" -c '
import ctypes, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
own = os.open("/proc/self/ns/net", os.O_RDONLY)
there = os.open(sys.argv[1], os.O_RDONLY)
assert libc.setns(there, 0x40000000) == 0
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
assert libc.setns(own, 0x40000000) == 0
os.close(own)
os.close(there)
open(sys.argv[2], "w").close()
time.sleep(600)
' "/proc/$holder/fd/3" /tmp/sock-ready &
sock=$!
note sock "$sock"
wait_for /tmp/sock-ready 30 || exit 1
kill "$holder"
wait "$holder" 2>/dev/null
sleep 0.5
ls -l "/proc/$sock/fd"
inspect socket "$usb" --json

# Without the socket the namespace goes, and the kernel moves the interface back here.
kill "$sock"
wait "$sock" 2>/dev/null
back=$(net_of "$usb" 30) || exit 1
note back "$back"
inspect returned "$usb" --json
