#!/bin/bash
# An ext4 stick nobody uses.
. "$GUEST_LIB"
record_fixture
