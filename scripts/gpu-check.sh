#!/usr/bin/env bash
# gpu-check.sh — on a machine with an NVIDIA GPU: build ferry-train with `--features cuda`, then train a few hundred
# steps of both models on CUDA and on the CPU and print images/s for each (issue 4).
#
# nvcc comes from PyPI, so the default build and CI never need a CUDA install:
#   pip install "cuda-toolkit[nvcc,cudart,cccl,crt,nvvm]==13.2.2"    (nvcc 13.2; the CUDA 12 wheels ship no nvcc)
# plus the runtime libraries candle's cudarc loads when training (cuBLAS, cuRAND, NVRTC). The wheels install under
# site-packages/nvidia/…; the exact folder is looked up below (find … -name nvcc) rather than assumed, and printed.
# Set CUDA_HOME yourself to use an existing toolkit (no pip at all), e.g. on a machine without network access.
#
# Usage: scripts/gpu-check.sh [STEPS]   (default 300 steps of batch 64 per model and device)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-300}"

if [[ -z "${CUDA_HOME:-}" ]]; then
    VENV="${FERRY_CUDA_VENV:-$PWD/target/cuda-venv}"
    if [[ ! -x "$VENV/bin/python" ]]; then
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet "cuda-toolkit[nvcc,cudart,cccl,crt,nvvm,cublas,curand,nvrtc]==13.2.2"
    fi
    NVCC_PATH="$(find "$VENV" -type f -name nvcc -path '*/bin/*' | head -n1)"
    [[ -n "$NVCC_PATH" ]] || { echo "gpu-check: no nvcc found under $VENV" >&2; exit 1; }
    CUDA_HOME="$(dirname "$(dirname "$NVCC_PATH")")"
    # The pip layout splits lib folders per component (nvidia/<component>/lib or nvidia/cu13/lib): add them all.
    LIBS="$(find "$VENV" -type d \( -name lib -o -name lib64 \) -path '*nvidia*' | tr '\n' ':')"
    export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
fi
export CUDA_HOME
export NVCC="${NVCC:-$CUDA_HOME/bin/nvcc}"
export PATH="$CUDA_HOME/bin:$PATH"
export LD_LIBRARY_PATH="$CUDA_HOME/lib:$CUDA_HOME/lib64:${LD_LIBRARY_PATH:-}"
# 80 = Ampere (A100); an H100 also runs sm_80 code. Set 90 for Hopper-only kernels.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"

echo "gpu-check: CUDA_HOME=$CUDA_HOME"
echo "gpu-check: NVCC=$NVCC ($("$NVCC" --version | tail -n1))"
echo "gpu-check: CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

cargo test --release -p ferry-train --features cuda --test throughput --no-run
for dev in cuda cpu; do
    FERRY_DEVICE="$dev" FERRY_STEPS="$STEPS" \
        cargo test --release -p ferry-train --features cuda --test throughput -- --ignored --nocapture 2>&1 |
        grep 'img/s'
done
