#!/usr/bin/env bash
# Capture real QEMU/KVM memslot traces (trace event `kvm_set_user_memory`) for
# the `memslots` test suite.
#
# Usage (as root, on a Debian/bookworm-like host with /dev/kvm):
#     tests/data/capture-traces.sh            # writes tests/data/traces/*.log + README.md
#
# What it does:
#   * installs qemu-system-x86 (and, best effort, ovmf) with apt-get if missing;
#   * runs a handful of short, headless QEMU guests with -enable-kvm and no
#     disk, no network (SeaBIOS ends at "No bootable device", which is fine:
#     the PAM shadowing of the BIOS/option ROMs and the PCI BAR probing all
#     happen within the first second or two);
#   * for the hot-plug and migration scenarios, drives the HMP monitor over
#     -monitor stdio connected to a FIFO in a private temp dir (no sockets on
#     the network, no extra tools such as socat needed);
#   * keeps only `kvm_set_user_memory` lines (-trace kvm_set_user_memory with
#     -D FILE), overwriting previous logs, so re-running is idempotent
#     (the host addresses `ua=` and timestamps of course differ per run);
#   * writes traces/README.md: QEMU version, the exact command of every trace,
#     its line count, number of commits and whether any ret= was non-zero.
#
# Commit counting rule used for the README: the first line opens commit 1, and
# a DELETE (size=0x0) that follows a non-DELETE line opens a new commit (QEMU's
# KVM listener issues all DELETEs of a commit before its CREATEs).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/traces"
QEMU=qemu-system-x86_64
RUN_SECS=${RUN_SECS:-7}          # how long the plain boot runs last
SETTLE_SECS=${SETTLE_SECS:-5}    # SeaBIOS is done with PAM/PCI after ~2.5-4 s

log() { printf '[capture] %s\n' "$*" >&2; }

# --------------------------------------------------------------------------
# 1. Prerequisites
# --------------------------------------------------------------------------
if [[ $EUID -ne 0 ]]; then
    log "warning: not root; installing packages will fail and /dev/kvm may be unusable"
fi

APT_UPDATED=0
apt_install() {   # apt_install PKG...   (runs apt-get update once per script run)
    if [[ $APT_UPDATED -eq 0 ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

if ! command -v "$QEMU" >/dev/null 2>&1; then
    log "installing qemu-system-x86"
    apt_install qemu-system-x86
fi

# OVMF is optional: try to install it, but carry on without it.
OVMF_BIOS=/usr/share/ovmf/OVMF.fd
OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd
if [[ ! -e $OVMF_BIOS ]]; then
    log "trying to install ovmf (optional)"
    apt_install ovmf || log "ovmf not installable; skipping the OVMF traces"
fi

if [[ ! -w /dev/kvm ]]; then
    log "error: /dev/kvm is missing or not writable"
    exit 1
fi

mkdir -p "$OUT"
TMP="$(mktemp -d /tmp/memslot-traces.XXXXXX)"
QEMU_PID=""
cleanup() {
    # Only ever kill the QEMU this script started (by its PID).
    if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# Options shared by every run: KVM, headless, no serial, no network, trace only
# the memslot event.  (-D FILE is appended per run.)
COMMON=(-enable-kvm -display none -serial none -nic none -trace kvm_set_user_memory)

# README rows are accumulated here and written at the end.
ROWS=()

# describe NAME CMD...  -> append a README row with the trace statistics
describe() {
    local name=$1; shift
    local file="$OUT/$name.log"
    local stats
    # Fields: lines, commits, non-zero-ret count, other (non-matching) lines.
    stats=$(awk '
        BEGIN { re = "^([0-9]+@[0-9]+\\.[0-9]+:)?kvm_set_user_memory (AddrSpace#[0-9]+ )?Slot#[0-9]+ flags=0x[0-9a-f]+ gpa=0x[0-9a-f]+ size=0x[0-9a-f]+ ua=0x[0-9a-f]+( guest_memfd=-?[0-9]+ guest_memfd_offset=0x[0-9a-f]+)? ret=-?[0-9]+$" }
        $0 !~ re { other++; next }
        {
            n++
            del = ($0 ~ / size=0x0 /)
            if (n == 1 || (del && !prevdel)) commits++
            prevdel = del
            if ($0 !~ / ret=0$/) bad++
        }
        END { printf "%d %d %d %d", n, commits, bad, other }' "$file")
    local n commits bad other
    read -r n commits bad other <<<"$stats"
    # Shell-quote only the arguments that need it (printf %q would also
    # escape the commas of -m 1024,slots=2,... which is legal but ugly).
    local cmd="" arg
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then cmd+="$arg "; else cmd+="'$arg' "; fi
    done
    cmd=${cmd% }
    # Make the command independent of where the repo is checked out.
    cmd=${cmd//"$OUT"/traces}
    local note=""
    [[ -n ${NOTE:-} ]] && note=" $NOTE"
    ROWS+=("| \`$name.log\` | \`$cmd\`$note | $n | $commits | $([[ $bad -eq 0 ]] && echo no || echo "yes ($bad)") | $other |")
    log "$name: $n lines, $commits commits, non-zero ret: $bad, other lines: $other"
}

# run_timed NAME SECS QEMU-ARGS...  -> boot for SECS seconds, then SIGTERM
# (QEMU handles SIGTERM like `quit`: it shuts down cleanly and flushes -D).
run_timed() {
    local name=$1 secs=$2; shift 2
    local file="$OUT/$name.log"
    rm -f "$file"
    local cmd=("$QEMU" "${COMMON[@]}" "$@" -monitor none -D "$file")
    log "running $name (${secs}s)"
    local rc=0
    timeout -s TERM "$secs" "${cmd[@]}" 2>"$TMP/$name.stderr" || rc=$?
    # 124 = stopped by timeout, which is the expected way to end these runs.
    if [[ $rc -ne 124 && $rc -ne 0 ]]; then
        log "$name: qemu exited with $rc:"; cat "$TMP/$name.stderr" >&2
        return 1
    fi
    # Some guests (OVMF under PVM-style nested KVM) die with an emulation
    # failure; QEMU then just pauses the VM. Record it in the README.
    if grep -q 'KVM internal error' "$TMP/$name.stderr"; then
        log "$name: guest hit 'KVM internal error' (trace ends there)"
        NOTE="(guest stopped early: QEMU reported \`KVM internal error. Suberror: 1\` / emulation failure on this host)" \
            describe "$name" timeout -s TERM "$secs" "${cmd[@]}"
    else
        describe "$name" timeout -s TERM "$secs" "${cmd[@]}"
    fi
}

# --- HMP monitor over a FIFO -------------------------------------------------
# mon_start NAME QEMU-ARGS...  starts QEMU in the background with
# -monitor stdio; stdin is a FIFO we keep open on fd $MON, stdout goes to
# $TMP/NAME.mon.  mon_cmd sends a line, mon_wait waits for a regex in the
# monitor output, mon_quit sends `quit` and waits for QEMU to exit.
MON=""
MON_OUT=""
MON_CMD=()
mon_start() {
    local name=$1; shift
    local file="$OUT/$name.log"
    rm -f "$file"
    MON_OUT="$TMP/$name.mon"
    : >"$MON_OUT"
    mkfifo "$TMP/$name.in"
    MON_CMD=("$QEMU" "${COMMON[@]}" "$@" -monitor stdio -D "$file")
    log "running $name (monitor driven)"
    "${MON_CMD[@]}" <"$TMP/$name.in" >"$MON_OUT" 2>"$TMP/$name.stderr" &
    QEMU_PID=$!
    exec {MON}>"$TMP/$name.in"     # unblocks QEMU's open of its stdin
    mon_wait '\(qemu\)' 10
}
mon_cmd() {
    log "  (qemu) $*"
    printf '%s\n' "$*" >&"$MON"
}
mon_wait() {   # mon_wait REGEX TIMEOUT_SECS
    local re=$1 limit=$2 i
    for ((i = 0; i < limit * 10; i++)); do
        grep -Eq "$re" "$MON_OUT" && return 0
        kill -0 "$QEMU_PID" 2>/dev/null || { log "qemu died"; cat "$TMP"/*.stderr >&2; return 1; }
        sleep 0.1
    done
    log "timed out waiting for /$re/ in monitor output:"; cat "$MON_OUT" >&2
    return 1
}
mon_quit() {
    mon_cmd quit
    local rc=0
    wait "$QEMU_PID" || rc=$?
    QEMU_PID=""
    exec {MON}>&-
    if [[ $rc -ne 0 ]]; then
        log "qemu exited with $rc:"; cat "$MON_OUT" "$TMP"/*.stderr >&2
        return 1
    fi
}

# --------------------------------------------------------------------------
# 2. The traces
# --------------------------------------------------------------------------

# Plain SeaBIOS boots: RAM layout, PAM shadowing, VGA BIOS, PCI BAR probing.
run_timed pc-512m-std  "$RUN_SECS" -M pc  -m 512  -vga std
run_timed q35-2g-std   "$RUN_SECS" -M q35 -m 2048 -vga std
run_timed pc-1g-cirrus "$RUN_SECS" -M pc  -m 1024 -vga cirrus
# 4G on pc: 3G below 4G, the rest relocated above 4G (two RAM alias slots).
run_timed pc-4g-std    "$RUN_SECS" -M pc  -m 4096 -vga std
# virtio-vga (VGA BIOS) + virtio-net-pci with its iPXE option ROM BAR
# (efi-virtio.rom from ipxe-qemu).  The NIC has no netdev peer on purpose:
# no networking at all (QEMU warns "nic ... has no peer").
run_timed q35-1g-virtio-nic-rom "$RUN_SECS" -M q35 -m 1024 -vga none \
    -device virtio-vga -device virtio-net-pci
# Same as pc-512m-std but with -msg timestamp=on: Debian's QEMU 7.2 then
# prefixes every trace line with PID@SECONDS.MICROS: (log trace backend).
run_timed pc-512m-std-timestamps "$RUN_SECS" -M pc -m 512 -vga std -msg timestamp=on

# DIMM hot-plug: a new RAM region appears at the hot-plug area above 4G.
mon_start pc-dimm-hotplug -M pc -m 1024,slots=2,maxmem=4G -vga std
sleep "$SETTLE_SECS"                      # let SeaBIOS finish first
mon_cmd object_add memory-backend-ram,id=mem1,size=512M
mon_cmd device_add pc-dimm,id=dimm1,memdev=mem1
mon_cmd info memory-devices
mon_wait 'hotplugged: true' 10
sleep 1
mon_quit
NOTE="then on the monitor: (after ${SETTLE_SECS} s) \`object_add memory-backend-ram,id=mem1,size=512M\`, \`device_add pc-dimm,id=dimm1,memdev=mem1\`, \`info memory-devices\`, (1 s) \`quit\`" \
    describe pc-dimm-hotplug "${MON_CMD[@]}"

# Live migration to a sink: dirty logging (flags bit 0) is switched on slot by
# slot when migration starts.  QEMU postpones switching it off while the VM
# is stopped (state "postmigrate" after completion), so we `cont` the VM
# afterwards to see it switched off slot by slot as well.
mon_start migration-dirty-log -M pc -m 512 -vga std
sleep "$SETTLE_SECS"
mon_cmd 'migrate "exec:cat > /dev/null"'
for _ in $(seq 60); do                    # poll until completed (max ~60 s)
    mon_cmd info migrate
    sleep 1
    grep -Eq 'Migration status: (completed|failed)' "$MON_OUT" && break
done
mon_wait 'Migration status: completed' 5
mon_cmd cont
sleep 1
mon_quit
NOTE="then on the monitor: (after ${SETTLE_SECS} s) \`migrate \"exec:cat > /dev/null\"\`, \`info migrate\` every second until completed, \`cont\`, (1 s) \`quit\`" \
    describe migration-dirty-log "${MON_CMD[@]}"

# OVMF (optional).  -bios form: the whole image is a read-only ROM.
if [[ -e $OVMF_BIOS ]]; then
    run_timed q35-ovmf 8 -M q35 -m 1024 -vga std -bios "$OVMF_BIOS"
fi
# pflash form: code + a scratch copy of the variable store; flash writes
# toggle the pflash ROMD mode, i.e. slots disappear and come back.
if [[ -e $OVMF_CODE && -e $OVMF_VARS ]]; then
    cp "$OVMF_VARS" "$TMP/vars.fd"
    run_timed q35-ovmf-pflash 8 -M q35 -m 1024 -vga std \
        -drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE" \
        -drive "if=pflash,format=raw,unit=1,file=$TMP/vars.fd"
    # The scratch path is meaningless afterwards; show it symbolically.
    ROWS[-1]=${ROWS[-1]//"$TMP/vars.fd"/COPY_OF_OVMF_VARS_4M.fd}
fi

# --------------------------------------------------------------------------
# 3. README
# --------------------------------------------------------------------------
{
    echo "# QEMU kvm_set_user_memory traces"
    echo
    echo "Generated by \`tests/data/capture-traces.sh\` (do not edit by hand; re-run the script)."
    echo
    echo "QEMU: \`$("$QEMU" --version | head -n1)\`"
    echo
    echo "Host kernel: \`$(uname -r)\`, CPU vendor: \`$(awk -F': ' '/vendor_id/ {print $2; exit}' /proc/cpuinfo)\` (nested KVM in the capture environment)."
    echo
    echo "Every run also has \`-enable-kvm -display none -serial none -nic none -trace kvm_set_user_memory -D traces/NAME.log\`"
    echo "(already included in the commands below). \"commits\" counts a new commit at the first line and at every"
    echo "DELETE (\`size=0x0\`) following a non-DELETE line. \"other\" counts lines that do not match the"
    echo "\`kvm_set_user_memory\` formats of the reference doc."
    echo
    echo "| trace | command | lines | commits | non-zero ret | other |"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Line formats seen (counted over all logs above):"
    echo
    echo "- with \`AddrSpace#N\`: $(cat "$OUT"/*.log | grep -c 'AddrSpace#' || true) lines"
    echo "- with \`guest_memfd=\` fields: $(cat "$OUT"/*.log | grep -c 'guest_memfd=' || true) lines"
    echo "- with a \`PID@SECONDS.MICROS:\` prefix: $(cat "$OUT"/*.log | grep -Ec '^[0-9]+@[0-9]+\.[0-9]+:' || true) lines" \
         "(this QEMU prints it when run with \`-msg timestamp=on\`)"
    echo
    echo "The OVMF guests may stop early with a KVM emulation failure on some (nested) hosts; their"
    echo "traces then only show the machine set-up, not the firmware's own PAM/PCI work."
} >"$OUT/README.md"

log "done: $OUT"
