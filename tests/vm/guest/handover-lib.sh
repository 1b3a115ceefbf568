# Shared by the handover scenarios (sourced after lib.sh).
# No udevd runs in the guest: device-mapper tools must not wait for it.
export DM_DISABLE_UDEV=1
unmount_policy=/tmp/unmount-policy.toml
printf '[defaults]\nmount = "unmount"\nswap = "unmount"\nholder = "unmount"\nrestore = true\nflush_timeout = 120\n' \
    >"$unmount_policy"

# run_safeusb TAG ARGS...: run safeusb ARGS, keep exit code, stdout and stderr under TAG.
run_safeusb() {
    local tag=$1
    shift
    "$SAFEUSB" "$@" >"$OUT/$tag.out" 2>"$OUT/$tag.err"
    echo $? >"$OUT/$tag.rc"
    echo "safeusb $tag ($*): exit $(cat "$OUT/$tag.rc")"
}

mounted() { awk -v m="$1" '$5 == m' /proc/self/mountinfo | wc -l; }
present() { [ -e "/sys/class/block/$(basename "$1")" ] && echo 1 || echo 0; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
