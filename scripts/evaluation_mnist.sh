#!/usr/bin/env bash
# The MNIST-5k rows of EVALUATION.md: the σ selector (models/mnist-selector), each fixed σ of its
# levels with that level's expert, and DDRS with the memory on the σ = 0.25 model, all on every
# EVERY-th test image at n = 100,000 and α = 0.001. From the repository root, after
# scripts/make_mnist_models.sh (which leaves the experts at 0.12 and 0.5 in build/mnist):
#
#   scripts/evaluation_mnist.sh                   # every 5th test image (200 of 1,000)
#   N=10000 EVERY=20 scripts/evaluation_mnist.sh  # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
SC=${SC:-.venv/bin/smoothcert}
WORK=${WORK:-build/mnist}
OUT=${OUT:-runs/evaluation-mnist}
N=${N:-100000}
EVERY=${EVERY:-5}
BATCH=${BATCH:-10000}
mkdir -p "$OUT"

evaluate() {  # evaluate RUN BUNDLE [OPTIONS...]
  local run=$1 bundle=$2; shift 2
  [ -f "$OUT/$run/summary.json" ] && return 0
  "$SC" evaluate --bundle "$bundle" --data mnist-5k --split test --every "$EVERY" \
    --n0 100 --n "$N" --alpha 0.001 --batch "$BATCH" --seed 0 --overwrite --out "$OUT/$run" "$@"
}

evaluate cohen-0.25 models/mnist --sigma 0.25
evaluate cohen-0.5 "$WORK/expert-0.5" --sigma 0.5
evaluate cohen-1.0 "$WORK/expert-1.0" --sigma 1.0
evaluate ddrs-memory models/mnist --sigma-search ddrs --memory
evaluate selector models/mnist-selector
