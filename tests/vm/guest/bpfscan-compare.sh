#!/bin/bash
# The in-kernel scan (BPF iterators) against the /proc scan on this kernel (Debian 12's
# 6.1; in the kernel-6.12 boot, Debian 12's 6.12: the object is the one scripts/build-bpf
# built, CO-RE relocated at load): the host tier's comparison test, run here on loop
# devices of the guest. Then which walk of the mappings this kernel runs: the two halves
# that keep a summary of each process's mappings (Linux >= 6.7), or the one pass, and how
# many summaries a scan kept.
. "$GUEST_LIB"
PATH="$PATH:/usr/sbin:/sbin"
note kernel "$(uname -r)"
mkdir -p /tmp/bpfscan-pytest
cd "$REPO" || exit 1
PYTHONDONTWRITEBYTECODE=1 "$REPO/.venv/bin/python" -m pytest -q -p no:cacheprovider -rs \
    --basetemp=/tmp/bpfscan-pytest tests/host/test_bpfscan_compare_host.py \
    >"$OUT/pytest.out" 2>&1
note pytest_rc $?
PYTHONDONTWRITEBYTECODE=1 "$REPO/.venv/bin/python" -c \
    'from safeusb.host import bpfscan; bpfscan.read_records({})' >"$OUT/scan.out" 2>&1
note scan_rc $?
note halves "$(ls -d /sys/fs/bpf/safeusb-scan-*/scan_maps_even 2>/dev/null | wc -l)"
bpftool -j map dump name seen >"$OUT/seen.json" 2>>"$OUT/scan.out"
note summaries "$("$REPO/.venv/bin/python" -c \
    'import json, sys; print(len(json.load(open(sys.argv[1]))))' "$OUT/seen.json" 2>>"$OUT/scan.out")"
