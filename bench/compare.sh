#!/usr/bin/env bash
# compare.sh — ferry against its PyTorch twin on this machine, in one run (issue 7).
#
#   bench/compare.sh                      # every model, train and infer, batch 64, 2 threads, 3 rounds
#   ROUNDS=5 STEPS=60 THREADS=1 MODELS=plate-ctc-v2 bench/compare.sh
#
# Each round runs, back to back for every model and mode: ferry's fused ops, candle's generic ops (the baseline:
# `ferry-lab bench --ops generic`), optionally an older ferry-lab binary (BEFORE=path), and the twin
# (bench/torch_twin.py). Alternating keeps a change in machine load from favouring one side. Prints one JSON line
# per measurement, then a Markdown table of the ranges.
#
# Needs a release ferry-lab (LAB, default target/release/ferry-lab; `cargo build --release -p ferry-lab`) and a
# Python with torch (PYTHON, default python3). PyPI's torch wheel runs on the CPU:
#   python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy && PYTHON=/tmp/torchvenv/bin/python
set -euo pipefail

LAB=${LAB:-target/release/ferry-lab}
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-40}
BATCH=${BATCH:-64}
THREADS=${THREADS:-2}
BEFORE=${BEFORE:-}
MODELS=${MODELS:-plate-ctc-v2 plate-cnn mnist-cnn}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT

"$PYTHON" -c 'import torch' || { echo "compare.sh: $PYTHON has no torch (see the header of this script)" >&2; exit 1; }
[ -x "$LAB" ] || { echo "compare.sh: no $LAB (cargo build --release -p ferry-lab)" >&2; exit 1; }

echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), batch $BATCH, $THREADS threads, $STEPS steps" >&2
for round in $(seq "$ROUNDS"); do
  for model in $MODELS; do
    for mode in train infer; do
      args=(bench "$mode" --model "$model" --batch "$BATCH" --steps "$STEPS" --threads "$THREADS" --json)
      run() { # label, command...
        local label=$1; shift
        "$@" | sed "s/^{/{\"impl\": \"$label\", /" | tee -a "$OUT"
      }
      run fused "$LAB" "${args[@]}"
      run generic "$LAB" "${args[@]}" --ops generic
      if [ -n "$BEFORE" ]; then run before "$BEFORE" "${args[@]}"; fi
      run pytorch "$PYTHON" "$HERE/torch_twin.py" "$mode" --model "$model" --batch "$BATCH" --steps "$STEPS" --threads "$THREADS"
    done
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

"$PYTHON" - "$OUT" "$ROUNDS" "$MODELS" <<'EOF'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
# Lines come in a fixed order per round: model, mode, then the implementations.
impls = []
for r in runs:
    if r["impl"] not in impls:
        impls.append(r["impl"])
per = {}
i = 0
rounds = int(sys.argv[2])
models = sys.argv[3].split()
for _ in range(rounds):
    for model in models:
        for mode in ("train", "infer"):
            for impl in impls:
                assert runs[i]["model"] == model, (runs[i], model)
                per.setdefault((model, mode, impl), []).append(runs[i]["img_per_s"])
                i += 1
fmt = lambda v: f"{min(v):.0f}–{max(v):.0f}"
median = lambda v: sorted(v)[len(v) // 2]
print("| model | mode | " + " | ".join(impls) + " | fused ÷ pytorch (medians) |")
print("|---|---|" + "---|" * (len(impls) + 1))
for model in models:
    for mode in ("train", "infer"):
        cells = [fmt(per[(model, mode, impl)]) for impl in impls]
        ratio = f"{median(per[(model, mode, 'fused')]) / median(per[(model, mode, 'pytorch')]):.2f}×"
        print(f"| {model} | {mode} | " + " | ".join(cells) + f" | {ratio} |")
EOF
