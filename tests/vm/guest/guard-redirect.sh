#!/bin/bash
# The guard on: usbredirect (usbredir's client, the libusb path of SPICE's viewer) asked to
# take a mounted stick with 4 MiB unwritten.
. "$GUEST_DIR/guard-lib.sh"
guard_on
intf=$(storage_intf "$REDIR_USB")
mount_dirty "$REDIR_DEV" /tmp/g-redir
redirect "$REDIR_USB" redirect 30 "$intf"
after "$REDIR_DEV" /tmp/g-redir "$REDIR_USB" "$intf"
