#!/bin/bash
# The in-kernel scan (BPF iterators) against the /proc scan on this kernel (Debian 12's
# 6.1, its object built from the vmlinux.h scripts/build-bpf made): the host tier's
# comparison test, run here on loop devices of the guest.
. "$GUEST_LIB"
note kernel "$(uname -r)"
mkdir -p /tmp/bpfscan-pytest
cd "$REPO" || exit 1
PYTHONDONTWRITEBYTECODE=1 "$REPO/.venv/bin/python" -m pytest -q -p no:cacheprovider -rs \
    --basetemp=/tmp/bpfscan-pytest tests/host/test_bpfscan_compare_host.py \
    >"$OUT/pytest.out" 2>&1
note pytest_rc $?
