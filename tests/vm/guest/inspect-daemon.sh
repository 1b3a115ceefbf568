#!/bin/bash
# `safeusb inspect` and `safeusb status` asking safeusbd (started here on a socket of its
# own) print what reading the host in the command prints: the stick's first partition
# mounted with 4 MiB written and unwritten, and a process holding a file on it; as
# root, and as an unprivileged user (who, reading the host itself, could not see the
# holder: only the daemon's answer can name it).
. "$GUEST_LIB"
part=$(partition "$SEL_DEV" 1) || exit 1
mnt=/tmp/su-daemon-mnt
mkdir -p "$mnt"
mount -t ext4 "$part" "$mnt"
cp "$PAYLOAD/data.bin" "$mnt/data.bin"
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
sleep 600 <"$mnt/data.bin" &
holder=$!
note holder "$holder"
sleep 0.5
inspect d_json "$SEL_BUSDEV" --json --daemon-socket "$sock"
inspect l_json "$SEL_BUSDEV" --json --local
setpriv --reuid=65534 --regid=65534 --clear-groups "$SAFEUSB" inspect "$SEL_BUSDEV" \
    --daemon-socket "$sock" >"$OUT/n_d_text.out" 2>"$OUT/n_d_text.err"
echo $? >"$OUT/n_d_text.rc"
"$SAFEUSB" status --daemon-socket "$sock" >"$OUT/status_d.out" 2>&1
note status_d_rc $?
"$SAFEUSB" status --local >"$OUT/status_l.out" 2>&1
note status_l_rc $?
kill "$holder" "$daemon"
wait "$holder" "$daemon" 2>/dev/null
umount "$mnt"
