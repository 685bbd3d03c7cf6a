#!/usr/bin/env bash
# The README walkthrough with the Windows binaries, under Wine (issue 17): keygen, init, verify, inspect, import,
# unpack, pack, merge, status, and a refusal. Training is left out: it is the same code as on Linux and slow under
# emulation; pack ships weights instead, as a site that trains in PyTorch does.
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
trap 'wineserver -k >/dev/null 2>&1; wineserver -w >/dev/null 2>&1; rm -rf "$work" || true' EXIT
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
server keygen --id hq --out keys/
client keygen --id site-a --out keys/
server init --key keys/hq.key --arch plate-cnn --seed 1 --federation city-cctv --state hq/ --out usb/
client verify --trust keys/hq.pub usb/global-r0.ferry
client inspect usb/global-r0.ferry >inspect.txt
grep -q "federation  city-cctv" inspect.txt
client import --federation city-cctv --trust keys/hq.pub --state site-a/ usb/global-r0.ferry
client status --state site-a/
client unpack --trust keys/hq.pub usb/global-r0.ferry --out weights.safetensors
client pack --key keys/site-a.key --weights weights.safetensors --samples 100 --base usb/global-r0.ferry \
    --trust keys/hq.pub --out usb/
server merge --key keys/hq.key --trust keys/ --state hq/ --out usb/ --min-sites 1 usb/site-a-r0.ferry
server status --state hq/
client import --trust keys/hq.pub --state site-a/ usb/global-r1.ferry
client unpack --trust keys/hq.pub usb/global-r1.ferry --out global-r1.safetensors
cmp weights.safetensors global-r1.safetensors   # one site, its own weights back: FedAvg of one is the identity
# A refusal: a rollback to round 0 exits 1 with one line.
step "ferry-client import ... usb/global-r0.ferry (must be refused)"
if wine "$bin/ferry-client.exe" import --trust keys/hq.pub --state site-a/ usb/global-r0.ferry 2>err.txt; then
    echo "wine-smoke.sh: a rollback was accepted" >&2; exit 1
fi
cat err.txt
[[ $(wc -l <err.txt) -eq 1 ]] || { echo "wine-smoke.sh: the refusal was not one line" >&2; exit 1; }
echo
echo "wine smoke test: OK"
