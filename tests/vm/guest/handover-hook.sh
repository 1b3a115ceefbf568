#!/bin/bash
# The libvirt hook (installed as /etc/libvirt/hooks/qemu.d/safeusb before libvirtd started):
# a plain domain starts; a domain with the mounted, dirty stick is refused naming the
# mountpoint, leaving it mounted; with the unmount policy in the domain's metadata it
# starts after flush and unmount; destroying it gives the stick back, remounted.
. "$GUEST_LIB"
. "$GUEST_DIR/handover-lib.sh"
domain_xml() {  # NAME [METADATA]
    sed -e "s|<name>g1</name>|<name>$1</name>${2:-}|" \
        -e "s|</devices>|<hostdev mode='subsystem' type='usb'><source><address bus='${HK_BUSDEV%%:*}' device='${HK_BUSDEV##*:}'/></source></hostdev></devices>|" \
        "$LAB_DIR/g1.xml"
}
sed -e "s|<name>g1</name>|<name>plain</name>|" "$LAB_DIR/g1.xml" >/tmp/plain.xml
virsh define /tmp/plain.xml >/dev/null
virsh start --paused plain >"$OUT/plain.out" 2>&1
note plain_rc $?
virsh destroy plain >/dev/null 2>&1

mkdir -p /tmp/hk
mount -t ext4 "$HK_DEV" /tmp/hk
cp "$PAYLOAD/data.bin" /tmp/hk/data.bin
note dirty_kb "$(bdi_stat "$HK_DEV" BdiReclaimable)"
domain_xml h1 >/tmp/h1.xml
virsh define /tmp/h1.xml >/dev/null
virsh start --paused h1 >"$OUT/refused.out" 2>&1
note refused_rc $?
note mounted_after_refusal "$(mounted /tmp/hk)"
note dirty_kb_after_refusal "$(bdi_stat "$HK_DEV" BdiReclaimable)"

meta="<metadata><safeusb:policy xmlns:safeusb='https://safeusb.invalid/xmlns/1' mount='unmount'/></metadata>"
domain_xml h2 "$meta" >/tmp/h2.xml
virsh define /tmp/h2.xml >/dev/null
virsh start --paused h2 >"$OUT/started.out" 2>&1
note started_rc $?
note mounted_while_running "$(mounted /tmp/hk)"
note in_domain "$(virsh dumpxml h2 | grep -c "<hostdev mode='subsystem' type='usb'")"
# libvirtd restarts while the guest with the stick runs: the reconnect hook must pass.
pkill -x libvirtd
for _ in $(seq 1 100); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
libvirtd -d
for _ in $(seq 1 300); do virsh -q version >/dev/null 2>&1 && break; sleep 0.1; done
note state_after_restart "$(virsh domstate h2 2>&1)"
# Detached live, the stick is no longer in the domain's XML; at shutdown, what the domain
# took must still be given back, from safeusb's records.
hostdev_xml "$HK_BUSDEV" >/tmp/hk-hostdev.xml
virsh detach-device h2 /tmp/hk-hostdev.xml --live >"$OUT/detach.out" 2>&1
note detach_rc $?
note in_domain_after_detach "$(virsh dumpxml h2 | grep -c "<hostdev mode='subsystem' type='usb'")"
virsh destroy h2 >"$OUT/destroy.out" 2>&1
note destroy_rc $?
for _ in $(seq 1 100); do [ "$(mounted /tmp/hk)" = 1 ] && break; sleep 0.1; done
note mounted_after_destroy "$(mounted /tmp/hk)"
note readback "$(sha /tmp/hk/data.bin 2>/dev/null)"
note payload "$(sha "$PAYLOAD/data.bin")"
note record_after_destroy "$(ls "/run/safeusb/$HK_USB.json" 2>/dev/null | wc -l)"
# The rebound stick may have come back under another name.
for b in /sys/bus/usb/devices/"$HK_USB"/*/host*/target*/*/block/*; do
    [ -e "$b" ] && HK_DEV=/dev/$(basename "$b")
done

# A domain grown past 4 MiB through metadata set in pieces (libvirt writes <metadata>
# before <devices>): its USB host device must still be found, and the start refused.
cp "$PAYLOAD/data.bin" /tmp/hk/data2.bin
note dirty_kb_big "$(bdi_stat "$HK_DEV" BdiReclaimable)"
domain_xml big >/tmp/big.xml
virsh define /tmp/big.xml >/dev/null
/usr/bin/python3 - <<'PY' >"$OUT/metadata.out" 2>&1
import libvirt
dom = libvirt.open("qemu:///system").lookupByName("big")
for key in ("a", "b"):
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, f"<{key}>{'x' * 3145728}</{key}>",
                    key, f"https://safeusb.invalid/test/{key}", libvirt.VIR_DOMAIN_AFFECT_CONFIG)
PY
note metadata_rc $?
# Too large for libvirt's RPC (virsh dumpxml fails): measure its definition on disk.
note big_xml_bytes "$(wc -c </etc/libvirt/qemu/big.xml)"
virsh start --paused big >"$OUT/big.out" 2>&1
note big_rc $?
note mounted_after_big "$(mounted /tmp/hk)"
note dirty_kb_after_big "$(bdi_stat "$HK_DEV" BdiReclaimable)"
virsh destroy big >/dev/null 2>&1 || true  # refused: it never ran
