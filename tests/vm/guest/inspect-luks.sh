#!/bin/bash
# LUKS2 on the stick's only partition, opened (dm-crypt holds the partition).
. "$GUEST_LIB"
p1=$(partition "$LUKS_DEV" 1) || exit 1
head -c 32 /dev/urandom >/tmp/luks.key
cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file /tmp/luks.key "$p1"
cryptsetup open --key-file /tmp/luks.key "$p1" stickcrypt
wait_for /dev/mapper/stickcrypt || exit 1
note holders "$(ls "/sys/class/block/$(basename "$p1")/holders")"
inspect luks "$LUKS_USB" --json
