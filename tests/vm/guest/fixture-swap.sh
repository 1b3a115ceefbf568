#!/bin/bash
# Swap active on the whole stick.
. "$GUEST_LIB"
mkswap -q "$STICK_DEV"
swapon "$STICK_DEV"
record_fixture
