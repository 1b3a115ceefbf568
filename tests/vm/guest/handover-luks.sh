#!/bin/bash
# ext4 in LUKS on a partition, mounted with data: prepare flushes, unmounts, closes the
# mapping and unbinds. After release the mapping needs its key: opened here by hand.
. "$GUEST_LIB"
. "$GUEST_DIR/handover-lib.sh"
p1=$(partition "$LUKS_DEV" 1) || exit 1
head -c 32 /dev/urandom >/tmp/su-luks.key
cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file /tmp/su-luks.key "$p1"
cryptsetup open --key-file /tmp/su-luks.key "$p1" stickcrypt
wait_for /dev/mapper/stickcrypt || exit 1
mkfs.ext4 -q /dev/mapper/stickcrypt
mkdir -p /tmp/su-luks
mount /dev/mapper/stickcrypt /tmp/su-luks
cp "$PAYLOAD/data.bin" /tmp/su-luks/data.bin
run_safeusb prepare prepare "$LUKS_USB" --policy "$unmount_policy" --json
note mapping_after "$([ -e /dev/mapper/stickcrypt ] && echo 1 || echo 0)"
note disk_after "$(present "$LUKS_DEV")"
run_safeusb release release "$LUKS_USB" --policy "$unmount_policy" --json
disk=$(basename "$(ls -d /sys/bus/usb/devices/$LUKS_USB/*/host*/target*/*/block/* 2>/dev/null | head -1)")
note disk_back "$disk"
p1=$(partition "/dev/$disk" 1) || exit 1
cryptsetup open --key-file /tmp/su-luks.key "$p1" stickcrypt2 && mount /dev/mapper/stickcrypt2 /tmp/su-luks
note readback "$(sha /tmp/su-luks/data.bin 2>/dev/null)"
note payload "$(sha "$PAYLOAD/data.bin")"
