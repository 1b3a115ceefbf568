#!/bin/bash
# An ordinary user (nobody) on safeusbd's socket: asks to prepare and to release the
# mounted stick of the refuse scenario for g1, and to inspect it. prepare and release
# are refused (and logged by safeusbd), inspect is answered; the stick stays mounted.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
bus=${REFUSE_BUSDEV%%:*}
dev=${REFUSE_BUSDEV##*:}
cat >/tmp/su-ask.py <<'PY'
import json, sys
from safeusb.safeusbd.client import ask
from safeusb.errors import SafeUSBError
op = sys.argv[1]
args = {"bus": int(sys.argv[2]), "addr": int(sys.argv[3])}
if op != "inspect":
    args["domain"] = "g1"
try:
    result = ask(op, args, "/run/safeusb/safeusbd.sock", timeout=120)
except SafeUSBError as exc:
    print(f"error: {exc}")
    sys.exit(1)
print(json.dumps(result)[:2000])
PY
chmod 644 /tmp/su-ask.py
as_nobody() {  # TAG OP: ask safeusbd as uid/gid 65534, no groups
    run_step "$1" setpriv --reuid=65534 --regid=65534 --clear-groups -- \
        "$REPO/.venv/bin/python" /tmp/su-ask.py "$2" "$bus" "$dev"
}
note uid "$(setpriv --reuid=65534 --regid=65534 --clear-groups -- id -u)"
as_nobody prepare prepare
as_nobody release release
as_nobody inspect inspect
note mounted_after "$(mounted /tmp/su-refuse)"
note disk_after "$(present "$REFUSE_DEV")"
note records "$(ls /run/safeusb/*.json 2>/dev/null | wc -l)"
