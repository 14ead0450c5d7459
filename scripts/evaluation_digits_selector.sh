#!/usr/bin/env bash
# The digits rows of EVALUATION.md's σ selector section: experts trained with Gaussian noise at
# each level of Σ = {0.12, 0.25, 0.5} (digits_cnn, as scripts/evaluation.sh trains them), a σ
# selector over them (estimator smoothed at σ_e = 0.5; once with the default training settings,
# once with those chosen for MNIST), then each fixed σ, DDRS with the memory on the σ = 0.25
# model, and the selectors, on every EVERY-th test image at n = 100,000 and α = 0.001. From the
# repository root:
#
#   scripts/evaluation_digits_selector.sh                   # every 5th test image (90 of 450)
#   EVERY=10 scripts/evaluation_digits_selector.sh          # every 10th (45), as in EVALUATION.md
set -euo pipefail
cd "$(dirname "$0")/.."
SC=${SC:-.venv/bin/smoothcert}
OUT=${OUT:-runs/evaluation-digits-selector}
N=${N:-100000}
EVERY=${EVERY:-5}
EPOCHS=${EPOCHS:-60}
BATCH=${BATCH:-10000}
mkdir -p "$OUT/models" "$OUT/runs"

for s in 0.12 0.25 0.5; do
  [ -f "$OUT/models/expert-$s/model.json" ] || "$SC" train --method gaussian --arch digits_cnn \
    --data sklearn-digits --sigma "$s" --sigma-min 0.12 --sigma-max 1.0 --epochs "$EPOCHS" --lr 0.003 \
    --normalize 0.5,0.5 --seed 0 --out "$OUT/models/expert-$s"
done
[ -f "$OUT/models/selector/model.json" ] || "$SC" train --method selector \
  --experts "$OUT/models/expert-0.12" "$OUT/models/expert-0.25" "$OUT/models/expert-0.5" \
  --sigmas 0.12 0.25 0.5 --sigma 0.5 --arch digits_cnn --data sklearn-digits --epochs "$EPOCHS" \
  --lr 0.003 --normalize 0.5,0.5 --seed 0 --out "$OUT/models/selector"

evaluate() {  # evaluate RUN BUNDLE [OPTIONS...]
  local run=$1 bundle=$2; shift 2
  [ -f "$OUT/runs/$run/summary.json" ] && return 0
  "$SC" evaluate --bundle "$bundle" --data sklearn-digits --split test --every "$EVERY" \
    --n0 100 --n "$N" --alpha 0.001 --batch "$BATCH" --seed 0 --overwrite --out "$OUT/runs/$run" "$@"
}

# The same with the settings chosen for MNIST (scripts/selector_tuning_mnist.sh), not tuned again here.
[ -f "$OUT/models/selector-mnist-settings/model.json" ] || "$SC" train --method selector \
  --experts "$OUT/models/expert-0.12" "$OUT/models/expert-0.25" "$OUT/models/expert-0.5" \
  --sigmas 0.12 0.25 0.5 --sigma 0.5 --init "$OUT/models/expert-0.5" --temperature 0.3 --consistency 5 \
  --no-reweight --arch digits_cnn --data sklearn-digits --epochs "$EPOCHS" --lr 0.003 --normalize 0.5,0.5 \
  --seed 0 --out "$OUT/models/selector-mnist-settings"

evaluate selector "$OUT/models/selector"
evaluate selector-mnist-settings "$OUT/models/selector-mnist-settings"
for s in 0.12 0.25 0.5; do evaluate "cohen-$s" "$OUT/models/expert-$s" --sigma "$s"; done
evaluate ddrs-memory "$OUT/models/expert-0.25" --sigma-search ddrs --memory
