#!/usr/bin/env bash
# The MNIST demo models, from the repository root (docs/mnist.md says what they are):
#   models/mnist           a standard mnist_cnn trained with Gaussian noise at σ = 0.25 (the demo model)
#   models/mnist-selector  a σ selector over Σ = {0.12, 0.25, 0.5}: an estimator smoothed at σ_e = 0.5
#                          and one expert per level (the σ = 0.25 expert is models/mnist)
#   examples/mnist-<class>.png  the first test-split image of each class
# The experts at 0.12 and 0.5 are written to $WORK (default build/mnist), not kept in the repository:
# the selector bundle holds copies of all three.
set -euo pipefail
SC=${SC:-.venv/bin/smoothcert}
WORK=${WORK:-build/mnist}
COMMON=(--method gaussian --arch mnist_cnn --data mnist-5k --epochs 30 --lr 0.003 --normalize auto --seed 0)
"$SC" train "${COMMON[@]}" --sigma 0.25 --sigma-min 0.12 --sigma-max 1.0 --name mnist --out models/mnist
for s in 0.12 0.5; do
  "$SC" train "${COMMON[@]}" --sigma "$s" --name "mnist-$s" --out "$WORK/expert-$s"
done
"$SC" train --method selector --experts "$WORK/expert-0.12" models/mnist "$WORK/expert-0.5" \
  --sigmas 0.12 0.25 0.5 --sigma 0.5 --arch mnist_cnn --data mnist-5k --epochs 30 --lr 0.003 --seed 0 \
  --name mnist-selector --out models/mnist-selector
.venv/bin/python - <<'PY'
from pathlib import Path

from smoothcert.data import load_data
from smoothcert.imageio import encode_png

test = load_data("mnist-5k", "test")
for label in range(10):
    first = int((test.y == label).nonzero()[0][0])
    Path(f"examples/mnist-{label}.png").write_bytes(encode_png(test.x[first]))
print("examples/mnist-0.png … mnist-9.png written")
PY
