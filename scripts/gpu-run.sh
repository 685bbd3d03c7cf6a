#!/usr/bin/env bash
# gpu-run.sh — on a GPU machine with no Rust toolchain: run the CUDA binaries that `scripts/gpu-check.sh --build-only
# DIR` built elsewhere, and compare them with the PyTorch twin on the same GPU.
#
# Usage: scripts/gpu-run.sh DIR [smoke|tune SECONDS]
#   smoke (default): nvidia-smi; training images/s of every model on CUDA (200 steps) and on this machine's CPU
#                    (60 steps; the throughput test), and the PyTorch twin's images/s on CUDA for the plate readers.
#   tune SECONDS:    ferry's own trainer (tune_plates) on CUDA for about SECONDS, plate-ctc-deep-v2 on fresh mixed
#                    plates, two recipes side by side on the one GPU: the CPU recipe (batch 32, Adam 2e-3) and
#                    batch 128 (Adam 3e-3); each reports the validation set (2,000 plates, seeds 1003/1004) after
#                    every chunk of 8,000 plates and saves its model to $OUT (or DIR).
# The CUDA libraries candle loads at run time (cuBLAS, cuRAND, NVRTC) are looked up among the Python wheels there
# (site-packages/nvidia/...), then the system's.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="$1"
MODE="${2:-smoke}"
OUT_DIR="${OUT:-$DIR}"

ROOTS="$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)"
# (Never a stubs/ folder: a link-time libcuda stub found first would shadow the driver.)
LIBS="$({ find $ROOTS /usr/local/cuda*/lib64 /usr/local/nvidia/lib64 -not -path '*stubs*' \( -name 'libcublas.so*' \
    -o -name 'libcurand.so*' -o -name 'libnvrtc.so*' -o -name 'libcudart.so*' -o -name 'libcuda.so*' \) 2>/dev/null ||
    true; } |
    xargs -r -n1 dirname | sort -u | tr '\n' ':')"
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
echo "gpu-run: CUDA libraries from ${LIBS:-nowhere}"

case "$MODE" in
smoke)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    ldd "$DIR/throughput" | grep -E 'not found|libcu' || true
    for dev in cuda cpu; do
        steps=200
        [[ $dev == cpu ]] && steps=60
        FERRY_DEVICE="$dev" FERRY_STEPS="$steps" "$DIR/throughput" --ignored --nocapture 2>&1 |
            grep -E 'img/s|panicked|error' || true
    done
    if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
        for m in plate-ctc-v2 plate-ctc-deep-v2; do
            for b in 32 64 128; do
                python3 bench/torch_twin.py train --model "$m" --batch "$b" --steps 200 --warmup 20 --device cuda
            done
        done
    fi
    ;;
tune)
    SECS="${3:?tune needs SECONDS}"
    run() { # NAME LR BATCH
        TUNE_DEVICE=cuda TUNE_BUDGET_S="$SECS" TUNE_SAVE="$OUT_DIR/$1.safetensors" RAYON_NUM_THREADS=8 \
            "$DIR/tune_plates" plate-ctc-deep-v2 mixed 8000 1000 "$2" "$3" 200 cos 2000 2000 >"$OUT_DIR/$1.log" 2>&1
    }
    run gpu-b32 2e-3 32 &
    run gpu-b128 3e-3 128 &
    wait
    tail -n 40 "$OUT_DIR"/gpu-b*.log
    ;;
*)
    echo "gpu-run: unknown mode $MODE (smoke or tune SECONDS)" >&2
    exit 2
    ;;
esac
