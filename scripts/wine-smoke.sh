#!/usr/bin/env bash
# The README walkthrough with the Windows binaries, under Wine (issues 16, 17): HQ's keygen and init, enrolment
# kits for two sites, each site's enrol from its kit, then two rounds with nothing but `round` at each end; then
# status, config, log, and a refusal (a rollback to round 0). Training is real but tiny (8 generated plates, batch
# 4, one epoch), so it stays quick under emulation.
#
#   scripts/wine-smoke.sh [DIR]    DIR holds ferry-client.exe and ferry-server.exe
#                                  (default: target/x86_64-pc-windows-gnu/release)
# Needs Debian's wine (apt-get install wine wine64) and MinGW (gcc-mingw-w64-x86-64); runs headless, in a throwaway
# WINEPREFIX.
#
# Wine 8.0 (Debian 12) lacks bcryptprimitives.dll, whose ProcessPrng Rust's standard library (and getrandom) call
# for randomness on Windows 10 and newer, so the programs would not even start. The prefix gets a stand-in built
# here with MinGW: ProcessPrng over advapi32's RtlGenRandom. It is for this test only, never shipped; real Windows
# has the DLL.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/x86_64-pc-windows-gnu/release}")
for t in ferry-client ferry-server; do
    [[ -f $bin/$t.exe ]] || { echo "wine-smoke.sh: $bin/$t.exe is missing (cargo build --release --target x86_64-pc-windows-gnu -p $t)" >&2; exit 1; }
done
command -v wine >/dev/null || { echo "wine-smoke.sh: wine is not installed (apt-get install wine wine64)" >&2; exit 1; }

work=$(mktemp -d)
trap 'wineserver -k >/dev/null 2>&1 || true; wineserver -w >/dev/null 2>&1 || true; rm -rf "$work" || true' EXIT
export WINEPREFIX=$work/prefix WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml=" DISPLAY=
cd "$work"
step() { printf '\n$ %s\n' "$*"; }
client() { step "ferry-client $*"; wine "$bin/ferry-client.exe" "$@"; }
server() { step "ferry-server $*"; wine "$bin/ferry-server.exe" "$@"; }

wineboot --init >/dev/null 2>&1 || true
cat >shim.c <<'C'
#include <windows.h>
#define SystemFunction036 NTAPI SystemFunction036
#include <ntsecapi.h>
#undef SystemFunction036
BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len) {
        ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!RtlGenRandom(data, n)) return FALSE;
        data += n;
        len -= n;
    }
    return TRUE;
}
C
printf 'LIBRARY bcryptprimitives\nEXPORTS\n    ProcessPrng\n' >shim.def
x86_64-w64-mingw32-gcc -O2 -shared -o "$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll" shim.c shim.def -ladvapi32

client --version
# HQ, once: its key, round 0 on the stick (usb/), and the settings it remembers.
server keygen --id hq --out keys/
server init --key keys/hq.key --arch plate-ctc-v2 --seed 1 --federation city-cctv --state hq/ --out usb/
printf 'key = "../keys/hq.key"\nstick = "../usb"\n' >hq/ferry.toml
# Enrol: a signed kit per site on the stick; each site enrols from its kit, checking HQ's fingerprint.
server enroll --state hq/ --site site-a
server enroll --state hq/ --site site-b
fp=$(wine "$bin/ferry-client.exe" fingerprint --json keys/hq.pub | sed -n 's/.*"fingerprint": *"\([^"]*\)".*/\1/p')
[[ -n $fp ]] || { echo "wine-smoke.sh: no fingerprint read from keys/hq.pub" >&2; exit 1; }
for site in a:1 b:2; do
    s=${site%:*} seed=${site#*:}
    client enroll usb/kit-site-$s --state site-$s/ --hq-fingerprint "$fp" \
        --data plates:loose:8:$seed --eval-data plates:loose:4:9 --batch 4 --warmup 2 --epochs 1
    [[ -f usb/kit-site-$s/reply/site-$s.pub ]] || { echo "wine-smoke.sh: no reply key for site-$s" >&2; exit 1; }
done
# Round 1 and round 2: `round` at each site, then at HQ.
for r in 1 2; do
    client round --state site-a/
    client round --state site-b/
    server round --state hq/
    [[ -f usb/global-r$r.ferry ]] || { echo "wine-smoke.sh: round $r wrote no usb/global-r$r.ferry" >&2; exit 1; }
done
server status --state hq/ >status.txt
cat status.txt
grep -q "site-a" status.txt && grep -q "site-b" status.txt
client round --state site-a/ --json >round.json   # imports global-r2; trains; exports site-a-r2.ferry
grep -q '"carry"' round.json
[[ -f usb/site-a-r2.ferry ]] || { echo "wine-smoke.sh: round 3 at site-a wrote no usb/site-a-r2.ferry" >&2; exit 1; }
client config --state site-a/
client log --state site-a/
# A refusal: a rollback to round 0 exits 1 with one line.
step "ferry-client import ... usb/global-r0.ferry (must be refused)"
if wine "$bin/ferry-client.exe" import --state site-a/ usb/global-r0.ferry 2>err.txt; then
    echo "wine-smoke.sh: a rollback was accepted" >&2; exit 1
fi
cat err.txt
[[ $(wc -l <err.txt) -eq 1 ]] || { echo "wine-smoke.sh: the refusal was not one line" >&2; exit 1; }
echo
echo "wine smoke test: OK"
