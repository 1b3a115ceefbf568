#!/bin/bash
# usb-audio (QEMU's USB speaker, snd-usb-audio): idle; its sound card's control node and
# then its playback PCM node held open by a process.
. "$GUEST_LIB"
. "$GUEST_DIR/classes-lib.sh"
usb=$(usb_of 46f4:0002) || exit 1
note usb "$usb"
card=
for i in $(seq 1 150); do
    card=$(ls -d "/sys/bus/usb/devices/$usb":1.*/sound/card* 2>/dev/null | head -1)
    [ -n "$card" ] && break
    sleep 0.2
done
[ -n "$card" ] || { echo "no sound card under $usb" >&2; exit 1; }
ls "$card"
n=${card##*/card}
note card "$n"
wait_for "/dev/snd/controlC$n" 10 || exit 1
inspect idle "$usb" --json

sleep 600 <"/dev/snd/controlC$n" &
pid=$!
note control_pid $pid
sleep 0.5
inspect control "$usb" --json
kill $pid

pcm=$(ls "$card" | grep '^pcmC.*p$' | head -1)
note pcm "$pcm"
wait_for "/dev/snd/$pcm" 10 || exit 1
sleep 600 <"/dev/snd/$pcm" &
pid=$!
note pcm_pid $pid
sleep 0.5
ls -l "/proc/$pid/fd"
inspect pcm "$usb" --json
