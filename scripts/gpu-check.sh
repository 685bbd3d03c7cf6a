#!/usr/bin/env bash
# gpu-check.sh — on a machine with an NVIDIA GPU: build ferry-train with `--features cuda`, then train a few hundred
# steps of both models on CUDA and on the CPU and print images/s for each (issue 4).
#
# nvcc comes from PyPI, so the default build and CI never need a CUDA install:
#   pip install "cuda-toolkit[nvcc,cudart,cccl,crt,nvvm,cublas,curand,nvrtc]==13.0.2"    (nvcc 13.0; the CUDA 12
#   wheels ship no nvcc). 13.0, not newer: candle's kernels ship as PTX, which a driver older than the nvcc that
#   wrote it refuses ("the provided PTX was compiled with an unsupported toolchain"); nvcc 13.2's PTX failed on an
#   H200 with driver 580 (CUDA 13.0). FERRY_CUDA_TOOLKIT=VERSION picks another.
# plus the runtime libraries candle's cudarc loads when training (cuBLAS, cuRAND, NVRTC). The wheels install under
# site-packages/nvidia/…; the exact folder is looked up below (find … -name nvcc) rather than assumed, and printed.
# Set CUDA_HOME yourself to use an existing toolkit (no pip at all), e.g. on a machine without network access.
#
# Usage: scripts/gpu-check.sh [STEPS]   (default 300 steps of batch 64 per model and device)
#        scripts/gpu-check.sh --build-only DIR
#   builds, without running, the CUDA throughput test and the tune_plates example, stripped, into DIR, for a GPU
#   machine with no Rust toolchain (scripts/gpu-run.sh runs them there). Set CUDA_COMPUTE_CAP for that GPU (90 for
#   an H100/H200). The build goes to target/cuda (CARGO_TARGET_DIR), apart from the CPU build. Changing toolkit
#   later: delete target/cuda first, or candle-kernels keeps the PTX the old nvcc wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_ONLY=""
if [[ "${1:-}" == "--build-only" ]]; then
    BUILD_ONLY="${2:?--build-only needs a folder}"
    shift 2
fi
STEPS="${1:-300}"

if [[ -z "${CUDA_HOME:-}" ]]; then
    VENV="${FERRY_CUDA_VENV:-$PWD/target/cuda-venv}"
    if [[ ! -x "$VENV/bin/python" ]]; then
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet \
            "cuda-toolkit[nvcc,cudart,cccl,crt,nvvm,cublas,curand,nvrtc]==${FERRY_CUDA_TOOLKIT:-13.0.2}"
    fi
    NVCC_PATH="$(find "$VENV" -type f -name nvcc -path '*/bin/*' | head -n1)"
    [[ -n "$NVCC_PATH" ]] || { echo "gpu-check: no nvcc found under $VENV" >&2; exit 1; }
    CUDA_HOME="$(dirname "$(dirname "$NVCC_PATH")")"
    # The pip layout splits lib folders per component (nvidia/<component>/lib or nvidia/cu13/lib): add them all.
    LIBS="$(find "$VENV" -type d \( -name lib -o -name lib64 \) -path '*nvidia*' | tr '\n' ':')"
    export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
fi
export CUDA_HOME
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
export NVCC="${NVCC:-$CUDA_HOME/bin/nvcc}"
export PATH="$CUDA_HOME/bin:$PATH"
export LD_LIBRARY_PATH="$CUDA_HOME/lib:$CUDA_HOME/lib64:${LD_LIBRARY_PATH:-}"
# Linking (cargo check never links, so only a build finds this): the linker wants unversioned names (libcublas.so)
# and the wheels ship versioned ones (libcublas.so.13); and where no driver is installed (building for another
# machine) it wants libcuda.so. A stub defining the driver functions cudarc declares stands in for it: only the
# real driver ever loads, where the binary runs.
LINK_DIR="$PWD/target/cuda-link"
mkdir -p "$LINK_DIR"
find "$CUDA_HOME" -path '*/lib*' -name 'lib*.so.*' | while read -r f; do
    n="$(basename "$f")"
    ln -sf "$f" "$LINK_DIR/${n%%.so.*}.so"
done
if ! ldconfig -p 2>/dev/null | grep -qE '^\s+libcuda\.so '; then
    CUDARC_SRC="$(cargo metadata --format-version 1 --features ferry-train/cuda | python3 -c '
import json, os, sys
print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')"
    grep -rhoE 'pub unsafe fn cu[A-Z][A-Za-z0-9_]*' "$CUDARC_SRC/src/driver/sys" | sed 's/.* //' | sort -u |
        sed 's/.*/void &(void) {}/' >"$LINK_DIR/cuda-stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK_DIR/libcuda.so" "$LINK_DIR/cuda-stub.c"
    echo "gpu-check: no driver here: linking against a stub libcuda.so ($(wc -l <"$LINK_DIR/cuda-stub.c") functions)"
fi
export LIBRARY_PATH="$LINK_DIR:${LIBRARY_PATH:-}"
# 80 = Ampere (A100); an H100 also runs sm_80 code. Set 90 for Hopper-only kernels.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"

echo "gpu-check: CUDA_HOME=$CUDA_HOME"
echo "gpu-check: NVCC=$NVCC ($("$NVCC" --version | tail -n1))"
echo "gpu-check: CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if [[ -n "$BUILD_ONLY" ]]; then
    mkdir -p "$BUILD_ONLY"
    test_bin="$(cargo test --release -p ferry-train --features cuda --test throughput --no-run \
        --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "throughput" and m.get("executable"):
        print(m["executable"])')"
    cargo build --release -p ferry-train --features cuda --example tune_plates
    examples="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples"
    cp "$test_bin" "$BUILD_ONLY/throughput"
    cp "$examples/tune_plates" "$BUILD_ONLY/tune_plates"
    strip "$BUILD_ONLY/throughput" "$BUILD_ONLY/tune_plates"
    ls -la "$BUILD_ONLY"
    exit 0
fi

cargo test --release -p ferry-train --features cuda --test throughput --no-run
for dev in cuda cpu; do
    FERRY_DEVICE="$dev" FERRY_STEPS="$STEPS" \
        cargo test --release -p ferry-train --features cuda --test throughput -- --ignored --nocapture 2>&1 |
        grep 'img/s'
done
