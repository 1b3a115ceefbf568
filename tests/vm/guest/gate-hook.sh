#!/bin/bash
# The libvirt hook while safeusbd runs: a domain h1 that starts with the refuse scenario's
# stick (still mounted, 4 MiB unwritten) as a <hostdev> is refused at `virsh start` by the
# hook itself (root, in libvirtd's hook call), naming the mountpoint; the stick stays.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
sed -e "s|<name>g1</name>|<name>h1</name>|" \
    -e "s|</devices>|<hostdev mode='subsystem' type='usb'><source><address bus='${REFUSE_BUSDEV%%:*}' device='${REFUSE_BUSDEV##*:}'/></source></hostdev></devices>|" \
    "$LAB_DIR/g1.xml" >/tmp/h1.xml
virsh define /tmp/h1.xml >/dev/null
note safeusbd_up "$([ -S /run/safeusb/safeusbd.sock ] && echo 1 || echo 0)"
run_step start virsh start --paused h1
note state "$(virsh domstate h1)"
note mounted_after "$(mounted /tmp/su-refuse)"
note dirty_kb_after "$(bdi_stat "$REFUSE_DEV" BdiReclaimable)"
virsh undefine h1 >/dev/null 2>&1
