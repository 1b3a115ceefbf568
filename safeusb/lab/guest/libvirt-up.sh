# Sourced by driver.sh: configure and start libvirtd, then define and start (paused)
# the nested domain g1 (no disk, no kernel, a qemu-xhci controller).
# /etc and /var are overlays in the guest, so the host's files are untouched.
lv_conf=/etc/libvirt
sed -i -e '/^auth_unix_r[ow] *=/d' "$lv_conf/libvirtd.conf"
printf 'auth_unix_rw = "none"\nauth_unix_ro = "none"\n' >> "$lv_conf/libvirtd.conf"
sed -i -e '/^\(user\|group\|security_driver\|namespaces\|cgroup_controllers\) *=/d' "$lv_conf/qemu.conf"
if [ "${LIBVIRT_CONFIG:-stock}" = lab ]; then
    # The lab configuration, only for a scenario that says why it needs it.
    printf 'user = "root"\ngroup = "root"\nsecurity_driver = "none"\nnamespaces = []\ncgroup_controllers = []\n' \
        >> "$lv_conf/qemu.conf"
    mark libvirt_lab
else
    # As Debian ships it: qemu.conf's defaults (QEMU as libvirt-qemu, a private mount
    # namespace, AppArmor), libvirt's profiles loaded, cgroup v2 as systemd would mount it.
    . "$here/stock-up.sh"
fi
if [ -d "$share/hooks" ]; then
    mkdir -p "$lv_conf/hooks"
    cp -r "$share/hooks/." "$lv_conf/hooks/"
    find "$lv_conf/hooks" -type f -exec chmod +x {} +
fi
sed -i -e '/^log_outputs *=/d' "$lv_conf/libvirtd.conf"
echo 'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"' >> "$lv_conf/libvirtd.conf"
mkdir -p /run/libvirt /var/lib/libvirt/qemu /var/log/libvirt/qemu /var/cache/libvirt/qemu
# safeusbd, on its own (no systemd here), on its standard socket: the gate asks it.
if [ "${SAFEUSBD:-0}" = 1 ]; then
    setsid "$SAFEUSBD_CMD" -v >"$out/safeusbd.log" 2>&1 </dev/null &
    for _ in $(seq 1 100); do
        "$PYTHON" -c 'from safeusb.safeusbd.client import ask
ask("ping", {}, "/run/safeusb/safeusbd.sock", timeout=5)' 2>/dev/null && { mark safeusbd_up; break; }
        sleep 0.2
    done
    [ -S /run/safeusb/safeusbd.sock ] || log "safeusbd did not start (see safeusbd.log)"
fi
virtlogd -d
libvirtd -d
# Each answer is awaited for 5 s at most: a libvirtd stuck starting (once seen: it never
# answered) must not hang the boot. After 60 s it is started again, once.
libvirt_up=0
for attempt in 1 2; do
    for _ in $(seq 1 120); do
        if timeout 5 virsh -q -c qemu:///system version >/dev/null 2>&1; then
            libvirt_up=1
            break 2
        fi
        sleep 0.5
    done
    log "libvirtd did not answer within 60 s (attempt $attempt)"
    cp /var/log/libvirt/libvirtd.log "$out/libvirtd-attempt$attempt.log" 2>/dev/null
    ps -eo pid,stat,wchan:20,args | grep -E 'libvirtd|qemu' | grep -v grep >>"$out/libvirtd-attempt$attempt.log"
    pkill -KILL -x libvirtd
    pkill -KILL -f 'qemu-system.*-qmp' 2>/dev/null
    sleep 1
    libvirtd -d
done
[ "$libvirt_up" = 1 ] && mark libvirtd_up
if [ "${NESTED_DOMAIN:-1}" = 0 ]; then
    log "no nested domain asked for"
elif timeout 300 virsh -q -c qemu:///system define "$here/g1.xml" >>"$out/libvirt.log" 2>&1 \
        && timeout 300 virsh -q -c qemu:///system start --paused g1 >>"$out/libvirt.log" 2>&1; then
    mark domain_started
else
    log "nested domain g1 did not start (see libvirt.log)"
    ps -eo pid,stat,wchan:20,etime,args >>"$out/libvirt.log"
    cp /var/log/libvirt/libvirtd.log "$out/libvirtd.log" 2>/dev/null
fi
export LIBVIRT_DEFAULT_URI=qemu:///system
