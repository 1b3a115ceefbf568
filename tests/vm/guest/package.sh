#!/bin/bash
# The .deb built from this checkout, installed as an admin would while libvirtd runs:
# dpkg -i (nothing of the checkout used: clean PATH, no PYTHONPATH, cwd /), the AppArmor
# include it asks for, libvirtd restarted as it says. Then the packaged hook refuses
# `virsh start` of a domain with the mounted stick holding unwritten data, the packaged
# gate (a protected domain, the package's safeusbd) refuses its live attach, and lets a
# domain with the idle stick start and gives the stick back at destroy. dpkg -r: the
# hook does nothing any more and domains (with and without USB devices) start; dpkg -P:
# the package's files are gone and domains still start.
. "$GUEST_LIB"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
cd /
hook=/etc/libvirt/hooks/qemu.d/safeusb
site=/usr/lib/python3/dist-packages

start_libvirtd() {  # at most 120 s
    libvirtd -d
    local deadline=$(( $(date +%s) + 120 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        timeout 5 virsh -q version >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}
domain_xml() {  # NAME BUS:DEV
    sed -e "s|<name>g1</name>|<name>$1</name>|" \
        -e "s|</devices>|<hostdev mode='subsystem' type='usb'><source><address bus='${2%%:*}' device='${2##*:}'/></source></hostdev></devices>|" \
        "$LAB_DIR/g1.xml"
}
present() { [ -e "/sys/class/block/$(basename "$1")" ] && echo 1 || echo 0; }
mounted() { awk -v m="$1" '$5 == m' /proc/self/mountinfo | wc -l; }
plain_starts() {  # TAG: a domain without USB host devices starts
    virsh start --paused plain >"$OUT/plain-$1.out" 2>&1
    note "plain_$1_rc" $?
    virsh destroy plain >/dev/null 2>&1
}
sed -e "s|<name>g1</name>|<name>plain</name>|" "$LAB_DIR/g1.xml" >/tmp/plain.xml
virsh define /tmp/plain.xml >/dev/null

# Installed while libvirtd runs: the package says to restart it and does not.
note libvirtd_before "$(pgrep -x libvirtd)"
rm -f /var/lib/man-db/auto-update  # no man-db index rebuild under emulation
dpkg -i "$SHARE/files/safeusb.deb" >"$OUT/dpkg-i.out" 2>&1
note install_rc $?
note libvirtd_after_install "$(pgrep -x libvirtd)"
note status "$(dpkg-query -W -f='${Status}' safeusb 2>&1)"
note hook_mode "$(stat -c '%U:%G %a' "$hook" 2>&1)"
note socket_enabled "$(test -L /etc/systemd/system/sockets.target.wants/safeusbd.socket && echo 1 || echo 0)"
python3 -c 'import json, sys, safeusb; print(json.dumps({"file": safeusb.__file__, "path": sys.path}))' \
    >"$OUT/syspath.json" 2>&1
note shebang "$(head -1 /usr/bin/safeusb)"
/usr/bin/safeusb inspect "$IDLE_DEV" >"$OUT/inspect.out" 2>&1
note inspect_rc $?

# AppArmor as the package says (the packaged command; /etc is an overlay, the host's
# files are untouched); libvirt's domain template must still parse with the rules.
aa_local=/etc/apparmor.d/local/abstractions/libvirt-qemu
/usr/bin/safeusb install-confinement >"$OUT/confinement.out" 2>&1
note confinement_rc $?
note confinement_names_checkout "$(grep -c "$REPO" "$aa_local" /etc/apparmor.d/local/usr.sbin.libvirtd 2>/dev/null | awk -F: '{s += $2} END {print s + 0}')"
apparmor_parser -Q -K -I /etc/apparmor.d /etc/apparmor.d/libvirt/TEMPLATE.qemu >"$OUT/aa.out" 2>&1
note aa_parse_rc $?

pkill -x libvirtd
for _ in $(seq 1 300); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
note old_libvirtd_gone "$(pgrep -x libvirtd >/dev/null && echo 0 || echo 1)"
start_libvirtd
note restarted $?
note libvirtd_restarted "$(pgrep -x libvirtd)"

# The mounted stick with unwritten data: refused at virsh start, left as it was.
mkdir -p /tmp/pk
mount -t ext4 "$DIRTY_DEV" /tmp/pk
cp "$PAYLOAD/data.bin" /tmp/pk/data.bin
note dirty_kb "$(bdi_stat "$DIRTY_DEV" BdiReclaimable)"
domain_xml p1 "$DIRTY_BUSDEV" >/tmp/p1.xml
virsh define /tmp/p1.xml >/dev/null
virsh start --paused p1 >"$OUT/refused.out" 2>&1
note refused_rc $?
note p1_state "$(virsh domstate p1 2>&1)"
note mounted_after_refusal "$(mounted /tmp/pk)"
note dirty_kb_after_refusal "$(bdi_stat "$DIRTY_DEV" BdiReclaimable)"

# The packaged gate: safeusbd from the package (on its own: no systemd here), the plain
# domain protected and started behind the gate as libvirt-qemu under AppArmor; a live
# attach of the same mounted stick is refused with the reason, the stick left as it was.
setsid /usr/bin/safeusbd -v >"$OUT/safeusbd.log" 2>&1 </dev/null &
for _ in $(seq 1 300); do [ -S /run/safeusb/safeusbd.sock ] && break; sleep 0.2; done
/usr/bin/safeusb protect plain >"$OUT/protect.out" 2>&1
note protect_rc $?
virsh start --paused plain >"$OUT/protected-start.out" 2>&1
note protected_start_rc $?
note protected_emulator "$(virsh dumpxml plain | sed -n 's|.*<emulator>\(.*\)</emulator>.*|\1|p')"
note protected_user "$(ps -o user= -p "$(cat /run/libvirt/qemu/plain.pid 2>/dev/null)" 2>/dev/null)"
printf "<hostdev mode='subsystem' type='usb'><source><address bus='%s' device='%s'/></source></hostdev>\n" \
    "${DIRTY_BUSDEV%%:*}" "${DIRTY_BUSDEV##*:}" >/tmp/pk-hostdev.xml
virsh attach-device plain /tmp/pk-hostdev.xml --live >"$OUT/live.out" 2>&1
note live_rc $?
note mounted_after_live "$(mounted /tmp/pk)"
note dirty_kb_after_live "$(bdi_stat "$DIRTY_DEV" BdiReclaimable)"
note live_in_domain "$(virsh dumpxml plain | grep -c "<hostdev mode='subsystem' type='usb'")"
virsh destroy plain >/dev/null 2>&1
/usr/bin/safeusb unprotect plain >"$OUT/unprotect.out" 2>&1
note unprotect_rc $?
pkill -x safeusbd
for _ in $(seq 1 50); do pgrep -x safeusbd >/dev/null || break; sleep 0.1; done

# The idle stick: the domain starts with it; destroy gives it back to the host.
domain_xml p2 "$IDLE_BUSDEV" >/tmp/p2.xml
virsh define /tmp/p2.xml >/dev/null
virsh start --paused p2 >"$OUT/idle.out" 2>&1
note idle_rc $?
note idle_present_while_running "$(present "$IDLE_DEV")"
virsh destroy p2 >"$OUT/idle-destroy.out" 2>&1
for _ in $(seq 1 100); do
    for b in /sys/bus/usb/devices/"$IDLE_USB"/*/host*/target*/*/block/*; do
        [ -e "$b" ] && break 2
    done
    sleep 0.1
done
note idle_back "$(ls -d /sys/bus/usb/devices/"$IDLE_USB"/*/host*/target*/*/block/* 2>/dev/null | wc -l)"
note records_after_destroy "$(ls /run/safeusb/*.json 2>/dev/null | wc -l)"

# dpkg -r: the drop-in (a conffile, kept until purge) runs nothing; a domain with a USB
# host device starts; libvirtd keeps running.
dpkg -r safeusb >"$OUT/dpkg-r.out" 2>&1
note remove_rc $?
note status_removed "$(dpkg-query -W -f='${Status}' safeusb 2>&1)"
note package_dir_removed "$(test -e "$site/safeusb" && echo 0 || echo 1)"
note cli_removed "$(test -e /usr/bin/safeusb && echo 0 || echo 1)"
# Were its Python run, it would refuse (its code is gone) and say so.
note hook_kept "$(test -e "$hook" && echo 1 || echo 0)"
printf "<domain><name>x</name><devices><hostdev mode='subsystem' type='usb'></hostdev></devices></domain>" \
    | "$hook" x prepare begin - >"$OUT/hook-removed.out" 2>&1
note hook_removed_rc $?
virsh start --paused p2 >"$OUT/idle-removed.out" 2>&1
note idle_removed_rc $?
virsh destroy p2 >/dev/null 2>&1
note libvirtd_after_remove "$(pgrep -x libvirtd)"

# dpkg -P: the rest goes; domains still start (install-confinement's rules, left in the
# admin's files, include nothing of the package).
dpkg -P safeusb >"$OUT/dpkg-p.out" 2>&1
note purge_rc $?
note status_purged "$(dpkg-query -W -f='${db:Status-Abbrev}' safeusb 2>&1)"
note hook_after_purge "$(test -e "$hook" && echo 1 || echo 0)"
note aa_after_purge "$(test -e /etc/apparmor.d/abstractions/safeusb && echo 1 || echo 0)"
note socket_after_purge "$(test -L /etc/systemd/system/sockets.target.wants/safeusbd.socket && echo 1 || echo 0)"
plain_starts purged
