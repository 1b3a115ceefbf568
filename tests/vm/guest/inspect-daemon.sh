#!/bin/bash
# `safeusb inspect` and `safeusb status` asking safeusbd (started here on a socket of its
# own) print what reading the host in the command prints: the dirty stick, still mounted
# with 4 MiB unwritten since the dirty scenario, and a process holding a file on it; as
# root, and as an unprivileged user (who reading the host itself cannot see the holder).
. "$GUEST_LIB"
dir=/run/su-daemon-test
sock=$dir/safeusbd.sock
mkdir -p "$dir"
chmod 711 "$dir"
printf '[defaults]\n' >"$dir/policy.toml"
setsid "$REPO/.venv/bin/safeusbd" --socket "$sock" --policy "$dir/policy.toml" \
    --state-dir "$dir/state" >"$OUT/safeusbd.log" 2>&1 </dev/null &
daemon=$!
for _ in $(seq 1 300); do
    [ -S "$sock" ] && break
    sleep 0.2
done
note daemon_up "$([ -S "$sock" ] && echo yes || echo no)"
sleep 600 </tmp/dirty/data.bin &
holder=$!
note holder "$holder"
sleep 0.5
inspect d_json "$DIRTY_BUSDEV" --json --daemon-socket "$sock"
inspect l_json "$DIRTY_BUSDEV" --json --local
inspect d_text "$DIRTY_USB" --daemon-socket "$sock"
inspect l_text "$DIRTY_USB" --local
nobody() {
    local tag=$1
    shift
    setpriv --reuid=65534 --regid=65534 --clear-groups "$SAFEUSB" inspect "$@" \
        >"$OUT/$tag.out" 2>"$OUT/$tag.err"
    echo $? >"$OUT/$tag.rc"
}
nobody n_d_text "$DIRTY_USB" --daemon-socket "$sock"
nobody n_l_text "$DIRTY_USB" --local
"$SAFEUSB" status --daemon-socket "$sock" >"$OUT/status_d.out" 2>&1
note status_d_rc $?
"$SAFEUSB" status --local >"$OUT/status_l.out" 2>&1
note status_l_rc $?
kill "$holder" "$daemon"
wait "$holder" "$daemon" 2>/dev/null
true
