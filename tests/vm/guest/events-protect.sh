#!/bin/bash
# The policy asks safeusbd to protect new domains and to unmount (and later remount)
# sticks; `safeusb status` names g1 as unprotected; `safeusb protect --all` protects it,
# a second run says it already is. g1 then stops:
# the domains used from here on are defined later (events-newdomain.sh).
. "$GUEST_LIB"
. "$GUEST_DIR/gate-lib.sh"
mkdir -p /etc/safeusb
printf '[defaults]\nmount = "unmount"\nrestore = true\n\n[service]\nprotect_new_domains = true\n' \
    >/etc/safeusb/policy.toml
run_step status_before "$SAFEUSB" status
run_step all "$SAFEUSB" protect --all
run_step all_again "$SAFEUSB" protect --all
note inactive_emulator "$(emulator_of --inactive)"
run_step destroy virsh destroy g1
