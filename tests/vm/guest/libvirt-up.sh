# Sourced by driver.sh: configure and start libvirtd, then define and start (paused)
# the nested domain g1 (no disk, no kernel, a qemu-xhci controller).
# /etc and /var are overlays in the guest, so the host's files are untouched.
lv_conf=/etc/libvirt
sed -i -e '/^auth_unix_r[ow] *=/d' "$lv_conf/libvirtd.conf"
printf 'auth_unix_rw = "none"\nauth_unix_ro = "none"\n' >> "$lv_conf/libvirtd.conf"
sed -i -e '/^\(user\|group\|security_driver\|namespaces\|cgroup_controllers\) *=/d' "$lv_conf/qemu.conf"
printf 'user = "root"\ngroup = "root"\nsecurity_driver = "none"\nnamespaces = []\ncgroup_controllers = []\n' \
    >> "$lv_conf/qemu.conf"
if [ -d "$share/hooks" ]; then
    mkdir -p "$lv_conf/hooks"
    cp -r "$share/hooks/." "$lv_conf/hooks/"
    find "$lv_conf/hooks" -type f -exec chmod +x {} +
fi
mkdir -p /run/libvirt /var/lib/libvirt/qemu /var/log/libvirt/qemu /var/cache/libvirt/qemu
virtlogd -d
libvirtd -d
for _ in $(seq 1 600); do
    virsh -q -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.1
done
mark libvirtd_up
if virsh -q -c qemu:///system define "$here/g1.xml" >>"$out/libvirt.log" 2>&1 \
        && virsh -q -c qemu:///system start --paused g1 >>"$out/libvirt.log" 2>&1; then
    mark domain_started
else
    log "nested domain g1 did not start (see libvirt.log)"
fi
export LIBVIRT_DEFAULT_URI=qemu:///system
