#!/bin/bash
# The raw disk node held open by a process that has nothing mounted.
. "$GUEST_LIB"
sleep 600 <"$HELD_DEV" &
note pid $!
sleep 0.5
inspect held "$HELD_USB" --json
