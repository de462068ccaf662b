#!/usr/bin/env bash
# Capture QEMU 7.2's kvm_set_user_memory trace of the boot `memslots boot` runs: Debian's SeaBIOS
# (bios.bin, 128 KiB) on an i440fx machine with no VGA, NIC or disks, its kvmvapic option ROM off,
# until SeaBIOS prints "No bootable device" on the debug port (0x402).
#
# Usage (as root, with /dev/kvm): tests/data/traces/boot/capture-seabios.sh
#     SMP=4 MEM=512 by default; writes seabios-pc-smp${SMP}-m${MEM}.log beside this script and
#     appends nothing else: README.md says what each committed log is.
#
# `memslots boot` compares the mapping its VMM leaves after POST with the mapping this trace ends
# in (`final_map_matches_qemu`). Re-running changes only the host addresses (`ua=`).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SMP=${SMP:-4}
MEM=${MEM:-512}
BIOS=${BIOS:-/usr/share/seabios/bios.bin}
LIMIT_SECS=${LIMIT_SECS:-60}
OUT="$HERE/seabios-pc-smp${SMP}-m${MEM}.log"

log() { printf '[capture-seabios] %s\n' "$*" >&2; }

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
[[ -f $BIOS ]] || need+=(seabios)
if [[ ${#need[@]} -gt 0 ]]; then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# -nodefaults: no VGA, NIC, floppy or CD-ROM (the VMM has none); kvm-apic.vapic=false: no
# kvmvapic option ROM (it splits a slot at 0xc3000); isa-debugcon on 0x402: SeaBIOS's log.
qemu-system-x86_64 -accel kvm -M pc -smp "$SMP" -m "$MEM" -bios "$BIOS" \
    -global kvm-apic.vapic=false -nodefaults -display none -monitor none -serial none \
    -chardev file,id=dbg,path="$WORK/debugcon.txt" -device isa-debugcon,iobase=0x402,chardev=dbg \
    -trace kvm_set_user_memory -D "$WORK/trace.log" 2>"$WORK/stderr.txt" &
QEMU_PID=$!

deadline=$((SECONDS + LIMIT_SECS))
until grep -q "No bootable device" "$WORK/debugcon.txt" 2>/dev/null; do
    if ! kill -0 "$QEMU_PID" 2>/dev/null; then
        log "QEMU ended before SeaBIOS's last message:"; cat "$WORK/stderr.txt" >&2; exit 1
    fi
    if (( SECONDS >= deadline )); then
        log "no \"No bootable device\" within ${LIMIT_SECS}s"; kill "$QEMU_PID"; exit 1
    fi
    sleep 0.2
done
kill "$QEMU_PID"
wait "$QEMU_PID" 2>/dev/null || true

grep '^kvm_set_user_memory ' "$WORK/trace.log" > "$OUT"
log "$(qemu-system-x86_64 --version | head -1)"
log "$(grep -c . "$OUT") calls in $OUT; $(grep -m1 'Found .* cpu(s)' "$WORK/debugcon.txt")"
