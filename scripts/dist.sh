#!/usr/bin/env bash
# Release artefacts (issue 17): stripped ferry-client and ferry-server for Linux and Windows, a .deb of each (with
# man pages, shell completions and docs), and SHA256SUMS signed with a ferry key. `just dist` runs this.
#
#   scripts/dist.sh              everything, into target/ferry-dist/
#   FERRY_RELEASE_KEY=keys/ferry-release.key scripts/dist.sh
#                                sign with the release key (without it: a throwaway key made for this build,
#                                good for checking the pipeline, not for publishing)
#
# Needs: the Windows target and MinGW (`rustup target add x86_64-pc-windows-gnu`, Debian's gcc-mingw-w64-x86-64)
# and cargo-deb (installed with `cargo install cargo-deb --locked` when missing). docs/install.md says how a
# user checks what this makes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

say() { printf 'dist.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
[[ -n $version ]] || die "no version in Cargo.toml [workspace.package]"
out=$root/target/ferry-dist
assets=$root/target/dist-assets
win=x86_64-pc-windows-gnu
tools=(ferry-client ferry-server)

rustup target list --installed 2>/dev/null | grep -qx "$win" \
    || die "the Windows target is missing: rustup target add $win"
command -v x86_64-w64-mingw32-gcc >/dev/null \
    || die "the MinGW cross-compiler is missing: apt-get install gcc-mingw-w64-x86-64"
if ! cargo deb --version >/dev/null 2>&1; then
    say "installing cargo-deb"
    cargo install cargo-deb --locked --quiet
fi

rm -rf "$out" "$assets"
mkdir -p "$out"
pkgs=()
for t in "${tools[@]}"; do pkgs+=(-p "$t"); done

say "building for Linux (profile dist: release, stripped)"
cargo build --locked --profile dist "${pkgs[@]}"
say "building for Windows ($win)"
cargo build --locked --profile dist --target "$win" "${pkgs[@]}"

for t in "${tools[@]}"; do
    bin=$root/target/dist/$t
    cp "$bin" "$out/$t-$version-x86_64-linux"
    cp "$root/target/$win/dist/$t.exe" "$out/$t-$version-x86_64-windows.exe"
    # Man pages and completions, from the clap definitions the binary carries.
    "$bin" man --out "$assets/$t/man" >/dev/null
    gzip -9n "$assets/$t/man/"*.1
    mkdir -p "$assets/$t/completions"
    "$bin" completions bash >"$assets/$t/completions/$t.bash"
    "$bin" completions zsh >"$assets/$t/completions/_$t"
    "$bin" completions fish >"$assets/$t/completions/$t.fish"
    say "packaging $t.deb"
    cargo deb --no-build --profile dist -p "$t" --output "$out/" >/dev/null
done

# Checksums, signed.
key=${FERRY_RELEASE_KEY:-}
pub=
if [[ -z $key ]]; then
    keydir=$root/target/dist-throwaway-key
    rm -rf "$keydir"
    "$root/target/dist/ferry-server" keygen --id ferry-throwaway --out "$keydir" >/dev/null
    key=$keydir/ferry-throwaway.key
    pub=$keydir/ferry-throwaway.pub
    say "WARNING: FERRY_RELEASE_KEY is not set: SHA256SUMS is signed with a throwaway key ($pub), not for publishing"
else
    pub=${key%.key}.pub
    [[ -f $pub ]] || die "$pub (the public half of FERRY_RELEASE_KEY) is missing"
fi
(cd "$out" && sha256sum -- *-x86_64-* *.deb >SHA256SUMS)
"$root/target/dist/ferry-server" sign-file --key "$key" "$out/SHA256SUMS" >/dev/null
cp "$pub" "$out/"
# Check what a user will check.
(cd "$out" && "$root/target/dist/ferry-client" verify-file --trust "$(basename "$pub")" SHA256SUMS >/dev/null \
    && sha256sum --quiet -c SHA256SUMS) || die "the signed checksums do not verify"

say "done: $out"
ls -l "$out" >&2
