#!/usr/bin/env bash
# ferry's test command (issue 17): set up what the tests need, without root, then run `cargo test --workspace`.
#
#   scripts/test.sh                 set up (first run: a few minutes), then run every test
#   scripts/test.sh -p ferry-bundle extra arguments go to `cargo test` (instead of --workspace)
#   scripts/test.sh --setup         set up only
#
# What it sets up, each kept between runs and skipped when already there:
#   .venv/                  a Python virtualenv with scripts/test-requirements.txt from PyPI (the interop test);
#   target/test-data/       Debian packages the tests read, unpacked with `dpkg -x` (so a file keeps its path):
#                           dataset-fashion-mnist, fonts-nanum, fonts-dejavu-core, zstd for its CLI, and age
#                           (the standard age CLI, 1.1.1 in Debian) to decrypt an encrypted bundle's payload.
#                           They are fetched with `apt-get download` and a private package list, so no root is
#                           needed; a file already installed system-wide (under /usr/share, /usr/bin) is not fetched.
# The tests find these through crates/testdata (FERRY_TEST_DATA, FERRY_PYTHON override the places) and fail, never
# skip, when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

say() { printf 'test.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

data=${FERRY_TEST_DATA:-$root/target/test-data}
venv=$root/.venv
reqs=$root/scripts/test-requirements.txt

# --- Python: a virtualenv with the interop test's packages -----------------------------------------------------
setup_python() {
    local py=$venv/bin/python3 stamp=$venv/.ferry-requirements
    if [[ -x $py ]] && cmp -s "$reqs" "$stamp" \
        && "$py" -c 'import numpy, safetensors.torch, cryptography, zstandard, pyrage, torch' 2>/dev/null; then
        return
    fi
    command -v python3 >/dev/null || die "python3 not found: install Python 3 (3.10 or newer)"
    if [[ ! -x $py ]]; then
        say "creating the Python virtualenv $venv"
        python3 -m venv "$venv" || die "python3 -m venv failed: on Debian or Ubuntu install python3-venv"
    fi
    say "installing $(grep -cv '^\s*\(#\|$\)' "$reqs") Python packages into $venv (PyTorch: ~3 GB, once)"
    "$py" -m pip install --quiet --disable-pip-version-check --requirement "$reqs"
    cp "$reqs" "$stamp"
}

# --- Debian packages, unpacked without root ---------------------------------------------------------------------
# package  a file it installs (relative to /)
packages=(
    "dataset-fashion-mnist usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"
    "fonts-nanum usr/share/fonts/truetype/nanum/NanumGothicBold.ttf"
    "fonts-dejavu-core usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    "zstd usr/bin/zstd"
    "age usr/bin/age"
)

setup_debian() {
    local missing=() entry pkg file
    for entry in "${packages[@]}"; do
        read -r pkg file <<<"$entry"
        [[ -e $data/$file || -e /$file ]] || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null && command -v dpkg >/dev/null \
        || die "need ${missing[*]} but apt-get is not here: install them, or unpack them under $data (FERRY_TEST_DATA)"
    say "fetching ${missing[*]} into $data"
    local apt=$data/.apt
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
    # A private package list and cache: works as a normal user, leaves the system's apt state alone.
    local opts=(-o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1
        -o "APT::Sandbox::User=$(id -un)" -o quiet=1)
    apt-get "${opts[@]}" update >"$apt/update.log" 2>&1 \
        || die "apt-get update failed (see $apt/update.log)"
    (cd "$apt/debs" && rm -f ./*.deb && apt-get "${opts[@]}" download "${missing[@]}" >"$apt/download.log" 2>&1) \
        || die "apt-get download ${missing[*]} failed (see $apt/download.log)"
    local deb
    for deb in "$apt"/debs/*.deb; do
        dpkg -x "$deb" "$data"
    done
    rm -rf "$apt/debs" "$apt/cache"
    for entry in "${packages[@]}"; do
        read -r pkg file <<<"$entry"
        [[ -e $data/$file || -e /$file ]] || die "$pkg was unpacked but $file is not in $data"
    done
}

setup_only=0
if [[ ${1:-} == --setup ]]; then setup_only=1; shift; fi

start=$SECONDS
setup_python
setup_debian
(( SECONDS - start < 2 )) || say "set up in $((SECONDS - start)) s"
export FERRY_TEST_DATA=$data FERRY_PYTHON=$venv/bin/python3
((setup_only)) && exit 0

if (($#)); then
    exec cargo test "$@"
fi
exec cargo test --workspace
