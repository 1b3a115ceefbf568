# Sourced by libvirt-up.sh: what a booted Debian host has before libvirtd starts and this
# guest (no systemd, no init scripts) lacks: securityfs and cgroup2 mounted, libvirt's
# AppArmor profiles loaded. Then safeusb's rules, installed as the README says.
mountpoint -q /sys/kernel/security || mount -t securityfs none /sys/kernel/security
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
cat /sys/kernel/security/lsm >"$out/lsm" 2>&1
# libvirt compiles each domain's AppArmor profile (virt-aa-helper) at its start and at
# every device change: ~5 s each under TCG, four or more per start. Expression tree
# simplification, which Debian's parser.conf offers to turn off, is a compile-time
# optimisation only: the policy enforced is the same, and it compiles in a fraction.
echo "Optimize=no-expr-simplify" >>/etc/apparmor/parser.conf \
    || log "cannot set Optimize=no-expr-simplify in /etc/apparmor/parser.conf"
if apparmor_parser -r /etc/apparmor.d/usr.sbin.libvirtd \
        /etc/apparmor.d/usr.lib.libvirt.virt-aa-helper >"$out/apparmor.log" 2>&1; then
    mark apparmor_loaded
else
    log "libvirt's AppArmor profiles did not load (see apparmor.log)"
fi
if [ "${SAFEUSB_CONFINEMENT:-1}" = 1 ]; then
    "$SAFEUSB" install-confinement >>"$out/apparmor.log" 2>&1 \
        || log "safeusb install-confinement failed (see apparmor.log)"
fi
