#!/bin/bash
# An idle stick (ext4, never mounted): nothing uses it.
. "$GUEST_LIB"
inspect idle "$IDLE_USB" --json
