#!/bin/bash
# msdos table, two partitions: LUKS2 on the first, opened as "stickcrypt", with
# ext4 inside mounted at /tmp/crypt; the second (ext4) unused.
. "$GUEST_LIB"
p1=$(partition "$STICK_DEV" 1) || exit 1
head -c 32 /dev/urandom >/tmp/luks.key
cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file /tmp/luks.key "$p1"
cryptsetup open --key-file /tmp/luks.key "$p1" stickcrypt
wait_for /dev/mapper/stickcrypt || exit 1
mkfs.ext4 -q /dev/mapper/stickcrypt
mkdir -p /tmp/crypt
mount -t ext4 /dev/mapper/stickcrypt /tmp/crypt
note mapper "$(basename "$(readlink -f /dev/mapper/stickcrypt)")"
record_fixture
