#!/bin/bash
# virt-manager's own hotplug path, driven through its library's command line: virt-xml
# (package virtinst) adds the stick as a host device to the running g1 (--update: live;
# then it defines the change). Mounted with 4 MiB unwritten, under the built-in policy:
# refused with safeusb's reason, nothing defined. Unmounted: attached, the guest's USB
# bus shows it. The definition is cleaned up afterwards for the scenarios that follow.
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
rm -f /etc/safeusb/policy.toml
export HOME=/tmp  # virt-xml keeps its log under ~/.cache; /root is read-only here
mp=/tmp/su-xml
mkdir -p "$mp"
mount -t ext4 "$XML_DEV" "$mp"
cp "$PAYLOAD/data.bin" "$mp/data.bin"
note dirty_kb "$(bdi_stat "$XML_DEV" BdiReclaimable)"
spec=$(printf '%03d.%03d' "${XML_BUSDEV%%:*}" "${XML_BUSDEV##*:}")
note spec "$spec"
run_step busy virt-xml g1 --add-device --hostdev "$spec" --update
note mounted_after "$(mounted "$mp")"
note dirty_kb_after "$(bdi_stat "$XML_DEV" BdiReclaimable)"
note live_after "$(usb_hostdevs)"
note defined_after "$(virsh dumpxml --inactive g1 | grep -c "<hostdev mode='subsystem' type='usb'")"
umount "$mp"
run_step idle virt-xml g1 --add-device --hostdev "$spec" --update
note live_idle "$(usb_hostdevs)"
note driver_idle "$(basename "$(readlink "/sys/bus/usb/devices/$XML_USB:1.0/driver" 2>/dev/null)" 2>/dev/null)"
run_step info_usb virsh qemu-monitor-command g1 --hmp 'info usb'
qemu=$(qemu_pid)
note xml_node "$(usb_node "$XML_BUSDEV")"
note qemu_usb_fds "$(qemu_usb_fds "$qemu")"
# Back to the host, and out of the definition.
hostdev_xml "$XML_BUSDEV" >/tmp/su-xml-hostdev.xml
run_step detach virsh detach-device g1 /tmp/su-xml-hostdev.xml --live
# virt-xml defined it with vendor and product (and bus/device, as both sticks match).
virsh dumpxml --inactive g1 | sed -n "/<hostdev mode='subsystem' type='usb'/,/<\/hostdev>/p" \
    >/tmp/su-xml-defined.xml
run_step undefine_dev virsh detach-device g1 /tmp/su-xml-defined.xml --config
for _ in $(seq 1 100); do [ -z "$(qemu_usb_fds "$qemu")" ] && break; sleep 0.1; done
"$SAFEUSB" release "$XML_USB" >"$OUT/release.out" 2>&1 || true
gate_log >"$OUT/gate.log"
