#!/usr/bin/env bash
# How Σ and the estimator's settings of models/mnist-selector were chosen (EVALUATION.md,
# "Choosing Σ and the settings"): on 200 MNIST-5k test images apart from the evaluated ones
# (every 5th from index 2; the evaluation takes every 5th from index 0), at n = 10,000 and
# α = 0.001, each fixed σ and one selector per setting. From the repository root, after
# scripts/make_mnist_models.sh:
#
#   scripts/selector_tuning_mnist.sh
#   .venv/bin/python scripts/evaluation_selector_report.py runs/selector-tuning/levels build/tuning-levels.png
#   .venv/bin/python scripts/evaluation_selector_report.py runs/selector-tuning/small build/tuning-small.png
set -euo pipefail
cd "$(dirname "$0")/.."
SC=${SC:-.venv/bin/smoothcert}
WORK=${WORK:-build/mnist}
OUT=${OUT:-runs/selector-tuning}
N=${N:-10000}
mkdir -p "$OUT/models" "$OUT/runs" "$OUT/levels" "$OUT/small"

evaluate() {  # evaluate RUN BUNDLE [OPTIONS...]
  local run=$1 bundle=$2; shift 2
  [ -f "$OUT/runs/$run/summary.json" ] || "$SC" evaluate --bundle "$bundle" --data mnist-5k --split test \
    --every 5 --start 2 --n0 100 --n "$N" --alpha 0.001 --batch 10000 --seed 0 --overwrite --out "$OUT/runs/$run" "$@"
}
selector() {  # selector NAME SIGMA_E [TRAIN OPTIONS...]: train a selector over Σ = {0.25, 0.5, 1.0}, evaluate it
  local name=$1 sigma_e=$2; shift 2
  [ -f "$OUT/models/$name/model.json" ] || "$SC" train --method selector \
    --experts models/mnist "$WORK/expert-0.5" "$WORK/expert-1.0" --sigmas 0.25 0.5 1.0 --sigma "$sigma_e" \
    --arch mnist_cnn --data mnist-5k --epochs 30 --lr 0.003 --seed 0 --out "$OUT/models/$name" "$@"
  evaluate "$name" "$OUT/models/$name"
  ln -sfn "../runs/$name" "$OUT/levels/$name"
}

# The levels: Σ = {0.12, 0.25, 0.5} (the first choice) against Σ = {0.25, 0.5, 1.0}.
[ -f "$WORK/expert-0.12/model.json" ] || "$SC" train --method gaussian --arch mnist_cnn --data mnist-5k \
  --epochs 30 --lr 0.003 --normalize auto --seed 0 --sigma 0.12 --name mnist-0.12 --out "$WORK/expert-0.12"
evaluate cohen-0.12 "$WORK/expert-0.12" --sigma 0.12
evaluate cohen-0.25 models/mnist --sigma 0.25
evaluate cohen-0.5 "$WORK/expert-0.5" --sigma 0.5
evaluate cohen-1.0 "$WORK/expert-1.0" --sigma 1.0
for s in 0.12 0.25 0.5; do ln -sfn "../runs/cohen-$s" "$OUT/small/cohen-$s"; done
for s in 0.25 0.5 1.0; do ln -sfn "../runs/cohen-$s" "$OUT/levels/cohen-$s"; done

# The estimator's settings, each one change from the row before (names sort in that order).
selector selector-a-defaults 1.0
selector selector-b-no-reweight 1.0 --no-reweight
selector selector-c-consistency-5 1.0 --no-reweight --consistency 5
selector selector-d-init 1.0 --no-reweight --consistency 5 --init "$WORK/expert-1.0"
selector selector-e-temperature-0.3 1.0 --no-reweight --consistency 5 --init "$WORK/expert-1.0" --temperature 0.3
selector selector-f-consistency-20 1.0 --no-reweight --consistency 20 --init "$WORK/expert-1.0" --temperature 0.3
selector selector-g-sigma-e-0.5 0.5 --no-reweight --consistency 5 --init "$WORK/expert-0.5" --temperature 0.3
