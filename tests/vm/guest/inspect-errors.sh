#!/bin/bash
# Selectors that match nothing, or several devices: exit 2, one line, no traceback.
. "$GUEST_LIB"
inspect nodevice dead:beef --json
inspect nodevice-text dead:beef
inspect nosysfs 9-9
inspect nonode /dev/nonexistent
inspect garbage 'not a selector'
# Every emulated stick is 46f4:0001: ambiguous.
inspect ambiguous 46f4:0001
