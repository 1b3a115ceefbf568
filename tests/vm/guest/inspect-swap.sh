#!/bin/bash
# Swap active on the whole stick.
. "$GUEST_LIB"
mkswap -q "$SWAP_DEV"
swapon "$SWAP_DEV"
cat /proc/swaps
inspect swap "$SWAP_USB" --json
